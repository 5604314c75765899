//! Watch caches, the one way every loop here reads the cluster: the reconcilers, the scaler
//! and the Kubernetes gateway each keep reflector stores fed by watches, never a GET per
//! decision.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// Which namespaces a loop serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespace(String),
}

/// A kind that can be watched into a cache.
pub trait Watched:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

/// The events that keep a cache current: the cache only moves while they are polled.
pub type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// `K` in every namespace of `scope`.
pub fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match scope {
        Scope::All => Api::all(client.clone()),
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
    }
}

/// Completes once `store` holds its first full list. kube's readiness signal wakes only the
/// last task that waited on it, so a second waiter on one store (the Controller waits on the
/// pool cache too) asks again every 100 ms instead of sleeping forever.
pub async fn until_ready<K: Watched>(store: &Store<K>) {
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready())
        .await
        .is_err()
    {}
}

/// A cache of what `api` and `config` select, and the events that feed it (watch errors are
/// retried with backoff by the stream itself).
pub fn cache<K: Watched>(api: Api<K>, config: watcher::Config) -> (Store<K>, Events<K>) {
    let (store, writer) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .boxed();
    (store, events)
}
