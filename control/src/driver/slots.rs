//! Which slots and ports the local driver's replicas hold, and the reaper that frees them
//! when a process exits. A slot is claimed (with its port) before the process starts, so
//! concurrent starts never share either, and released if the start fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proxy::names::PoolId;
use tokio::sync::{broadcast, watch};

use super::local::{DriverEvent, Replica, ReplicaId};

/// Replicas by pool and slot. Reaper tasks hold it too, but not the driver, so that dropping
/// the driver ends the spawner thread.
#[derive(Default)]
pub(super) struct Table(Mutex<HashMap<Key, Slot>>);

/// A claimed slot and port; dropped without [`Reservation::commit`], it frees them.
pub(super) struct Reservation {
    table: Arc<Table>,
    key: Option<Key>,
    pub(super) id: ReplicaId,
    pub(super) port: u16,
}

/// Waits for one running replica to exit.
pub(super) struct Exited {
    exited: watch::Receiver<bool>,
    /// The replica's grace period between SIGTERM and SIGKILL.
    pub(super) grace: Duration,
}

impl Table {
    /// Claims the lowest free slot of `pool` and the port `pick` chooses; `pick` is told
    /// which ports replicas already hold. `None` when `pick` finds none.
    pub(super) fn reserve(
        self: &Arc<Self>,
        pool: &PoolId,
        pick: impl FnOnce(&[u16]) -> Option<u16>,
    ) -> Option<Reservation> {
        let mut slots = self.lock();
        let taken: Vec<u16> = slots.values().map(Slot::port).collect();
        let port = pick(&taken)?;
        let id = (0..)
            .map(ReplicaId)
            .find(|id| !slots.contains_key(&(pool.clone(), *id)))
            .expect("fewer than u32::MAX replicas");
        slots.insert((pool.clone(), id), Slot::Starting { port });
        let (table, key) = (self.clone(), Some((pool.clone(), id)));
        Some(Reservation {
            table,
            key,
            id,
            port,
        })
    }

    /// Whether exactly this replica (same slot *and* same process) is running.
    pub(super) fn contains(&self, replica: &Replica) -> bool {
        self.with_running(replica, |_| ()).is_some()
    }

    /// Notes that an exit of `replica` is requested, if it is running.
    pub(super) fn mark_stopping(&self, replica: &Replica) -> Option<Exited> {
        self.with_running(replica, |running| {
            running.stopping.store(true, Ordering::Relaxed);
            Exited {
                exited: running.exited.clone(),
                grace: running.grace,
            }
        })
    }

    pub(super) fn running(&self) -> Vec<Replica> {
        let slots = self.lock();
        let running = slots.values().filter_map(|slot| match slot {
            Slot::Running(r) => Some(r.replica.clone()),
            Slot::Starting { .. } => None,
        });
        running.collect()
    }

    fn with_running<T>(&self, replica: &Replica, f: impl FnOnce(&Running) -> T) -> Option<T> {
        match self.lock().get(&(replica.pool.clone(), replica.id)) {
            Some(Slot::Running(running)) if running.replica == *replica => Some(f(running)),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        self.0.lock().expect("replica table lock")
    }
}

impl Reservation {
    /// Records the started process and hands it to a reaper task, which frees the slot and
    /// reports the exit on `events`.
    pub(super) fn commit(
        mut self,
        replica: &Replica,
        grace: Duration,
        child: tokio::process::Child,
        events: broadcast::Sender<DriverEvent>,
    ) {
        let key = self.key.take().expect("a reservation commits once");
        let (exit, exited) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        let replica = replica.clone();
        let running = Running {
            replica: replica.clone(),
            grace,
            stopping: stopping.clone(),
            exited,
        };
        self.table
            .lock()
            .insert(key.clone(), Slot::Running(running));
        let reaper = Reaper {
            table: self.table.clone(),
            key,
            exit,
            stopping,
            events,
        };
        tokio::spawn(reaper.reap(child, replica));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.table.lock().remove(&key);
        }
    }
}

impl Exited {
    /// Returns once the replica has exited and been reaped.
    pub(super) async fn wait(&mut self) {
        let _ = self.exited.wait_for(|&exited| exited).await;
    }
}

type Key = (PoolId, ReplicaId);

enum Slot {
    Starting { port: u16 },
    Running(Running),
}

struct Running {
    replica: Replica,
    grace: Duration,
    stopping: Arc<AtomicBool>,
    exited: watch::Receiver<bool>,
}

impl Slot {
    fn port(&self) -> u16 {
        match self {
            Slot::Starting { port } => *port,
            Slot::Running(running) => running.replica.addr.port(),
        }
    }
}

/// Everything needed to account for one replica's exit.
struct Reaper {
    table: Arc<Table>,
    key: Key,
    exit: watch::Sender<bool>,
    stopping: Arc<AtomicBool>,
    events: broadcast::Sender<DriverEvent>,
}

impl Reaper {
    async fn reap(self, mut child: tokio::process::Child, replica: Replica) {
        let (pool, id) = (replica.pool.clone(), replica.id);
        let status = child.wait().await;
        if let Err(error) = &status {
            tracing::error!(%pool, replica = %id, %error, "could not collect replica exit");
        }
        let status = status.ok();
        // Gone from the table before anyone hears of it: is_running() agrees with the event.
        self.table.lock().remove(&self.key);
        let requested = self.stopping.load(Ordering::Relaxed);
        tracing::info!(%pool, replica = %id, ?status, requested, "replica exited");
        self.exit.send_replace(true);
        let _ = self.events.send(DriverEvent::Exited {
            replica,
            status,
            requested,
        });
    }
}
