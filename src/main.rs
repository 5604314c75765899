//! `bkpool`: the command line.
//!
//! - `gateway`: the standalone mTLS gateway with static backends.
//! - `demo`: writes demonstration certificates and a gateway configuration.
//! - `controller`: the Kubernetes operator (leader-elected).
//! - `crd`: prints the `BuildKitPool` CustomResourceDefinition.
//! - `certapi`: the certificate API over the local PKI (tokens in, short-lived certificates out).
//! - `login`: trade a CI token for a client certificate, optionally running a command with it.
//! - `local`: gateway, control loop and local replicas in one process (scale to zero).
//! - `cert issue`: a client certificate for a local pool, in `buildctl --tlsdir` layout.
//! - `status`: the pools of a running `bkpool local`.
//! - `standin` (hidden): the stand-in backend, run as a replica process.

mod cert_cmd;
mod certapi_cmd;
mod controller_cmd;
mod demo;
mod gateway_cmd;
mod instances;
mod local_cmd;
mod login_cmd;
mod shutdown;
mod standin_cmd;
mod status_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bkpool",
    version,
    about = "mTLS gateway and scale-to-zero pools for BuildKit"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "BKPOOL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: static backends from a configuration file, or --kubernetes.
    Gateway(gateway_cmd::Args),
    /// Write demonstration certificates and a gateway configuration to a directory.
    Demo(demo::Args),
    /// Run the Kubernetes operator for BuildKitPool resources.
    Controller(controller_cmd::Args),
    /// Print the BuildKitPool CustomResourceDefinition (YAML).
    Crd,
    /// Serve the certificate API (ServiceAccount, OIDC and static tokens) over the local PKI.
    Certapi(certapi_cmd::Args),
    /// Get a short-lived client certificate for a pool with a CI token.
    Login(login_cmd::Args),
    /// Run local pools that sleep when idle and wake on connect, behind the gateway.
    Local(local_cmd::Args),
    /// Client certificates for local pools.
    #[command(subcommand)]
    Cert(cert_cmd::Command),
    /// Show the pools of a running `bkpool local`.
    Status(status_cmd::Args),
    /// The built-in stand-in backend (run by `bkpool local --standin` as a replica).
    #[command(hide = true)]
    Standin(standin_cmd::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bkpool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Gateway(args) => gateway_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
            Command::Local(args) => local_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Cert(command) => cert_cmd::run(command).map(|()| ExitCode::SUCCESS),
            Command::Status(args) => status_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Standin(args) => standin_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Controller(args) => {
                controller_cmd::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Crd => {
                print!("{}", control::crd::yaml::crd_yaml());
                Ok(ExitCode::SUCCESS)
            }
            Command::Certapi(args) => certapi_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Login(args) => login_cmd::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bkpool: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once. Many errors already name their cause in their own
/// message (`{path}: {source}`) and also return it as their source, so printing the chain as
/// it is (`{e:#}`) says the same thing two or three times; a cause already said is left out.
fn report(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BKPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that names its cause and also returns it as its source, as most do.
    #[derive(Debug)]
    struct Unreadable {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Unreadable {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Unreadable {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_reported_once() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let inner = Unreadable {
            path: "/x.pem".into(),
            source: missing,
        };
        let error = anyhow::Error::new(inner).context("loading certificates");
        assert_eq!(
            report(&error),
            "loading certificates: /x.pem: entity not found"
        );
        let plain = anyhow::anyhow!("no pool a").context("issuing");
        assert_eq!(report(&plain), "issuing: no pool a");
    }
}
