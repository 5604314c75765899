//! From a container of the pod spec to the process to start: the program (the container's
//! `command`, found in the kubelet's program directories or on `PATH`, or else the local
//! program its image maps to), the arguments and environment with `$(NAME)` expanded and
//! paths and addresses rewritten, the working directory, and the readiness probe.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;

use super::Node;
use super::env;
use super::probe::{Check, Readiness};
use super::rewrite::Rewrite;
use super::volumes::{PrepareError, Volumes};

/// Everything needed to start (and restart) one container.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub readiness: Option<Readiness>,
}

impl Launch {
    pub async fn prepare(
        node: &Node,
        pod: &Pod,
        container: &Container,
        volumes: &Volumes,
        ip: Ipv4Addr,
        pod_dir: &Path,
    ) -> Result<Self, PrepareError> {
        refuse_other_users(pod, container)?;
        let rewrite = Rewrite::new(volumes.mounts(container)?, ip);
        let defined = env::resolve(&node.client, pod, container, ip).await?;
        let expand = |s: &String| rewrite.apply(&env::expand(s, &defined));
        let mut env = vec![
            ("PATH".to_owned(), node.search_path()),
            ("HOME".to_owned(), pod_dir.to_string_lossy().into_owned()),
            ("HOSTNAME".to_owned(), pod.name_any()),
        ];
        env.extend(defined.iter().map(|(k, v)| (k.clone(), rewrite.apply(v))));
        let args = container.args.iter().flatten().map(expand);
        let (program, args) = match container.command.as_deref() {
            Some([first, rest @ ..]) => {
                let program = node.find_program(&expand(first))?;
                (program, rest.iter().map(expand).chain(args).collect())
            }
            _ => {
                let image = container.image.as_deref().unwrap_or_default();
                (node.image_program(image)?, args.collect())
            }
        };
        let dir = match &container.working_dir {
            Some(dir) => PathBuf::from(rewrite.apply(dir)),
            None => pod_dir.to_path_buf(),
        };
        let readiness = Readiness::of(container, ip, |command| {
            let [first, rest @ ..] = command else {
                return Err(PrepareError::Unsupported {
                    what: "an exec probe without a command".into(),
                });
            };
            Ok(Check::Exec {
                program: node.find_program(&rewrite.apply(first))?,
                args: rest.iter().map(|a| rewrite.apply(a)).collect(),
                env: env.clone(),
                dir: dir.clone(),
            })
        })?;
        Ok(Launch {
            program,
            args,
            env,
            dir,
            log: pod_dir.join(format!("{}.log", container.name)),
            readiness,
        })
    }

    /// The command to spawn, its output appended to the container's log.
    pub fn command(&self) -> std::io::Result<std::process::Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        std::fs::create_dir_all(&self.dir)?;
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }
}

/// Every process runs as the kubelet's own user: a pod that asks for another one (a rootless
/// buildkitd, `runAsUser: 1000`) would run as something it did not ask for, so it is refused
/// with a reason instead.
fn refuse_other_users(pod: &Pod, container: &Container) -> Result<(), PrepareError> {
    let pod_user = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.run_as_user);
    let user = container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or(pod_user);
    let own = rustix::process::geteuid().as_raw();
    match user {
        Some(user) if i64::from(own) != user => Err(PrepareError::Unsupported {
            what: format!(
                "runAsUser {user} (every container runs as the kubelet's uid {own}; \
                 for buildkitd, use a privileged pool)"
            ),
        }),
        _ => Ok(()),
    }
}
