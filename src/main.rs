//! `tollgate`: the command line. Parses arguments and wires the crates together; the work
//! lives in `gateway` and `admin`.

mod demo;
mod keys_cmd;
mod nodes_cmd;
mod ops;

/// mimalloc: requests allocate on the proxy threads and their log rows are freed on the
/// flusher's; glibc's malloc spent ~12k instructions per request on that pattern (callgrind,
/// benches/RESULTS.md). The passthrough baseline uses the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::Config;
use gateway::server::RunOptions;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering gateway for any HTTP app"
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_CONFIG",
        default_value = "conf/tollgate.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: proxy, admin server, metrics and flusher.
    Serve {
        /// Take the listening sockets over from a running gateway (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Run the gateway in front of a built-in echo app, with a temporary database and a key.
    Demo {
        /// Keep the demo's data in this PostgreSQL database instead (postgres://user@host/db;
        /// migrated, and given a demo license).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
    },
    /// Create or update the database schema, then exit.
    Migrate,
    /// Validate the configuration file and name every problem.
    CheckConfig,
    /// Graceful upgrade (systemd's ExecReload): start a new gateway that takes the running
    /// one's sockets over, then tell the running one (`--pid`) to finish and exit.
    Reload {
        /// The running gateway's process id (`$MAINPID` under systemd).
        #[arg(long)]
        pid: u32,
    },
    /// Copy the database to a new file with SQLite's online backup (safe while serving).
    Backup {
        /// The file to create.
        path: PathBuf,
    },
    /// Manage license keys (works while `serve` runs; it picks changes up within seconds).
    Keys {
        #[command(subcommand)]
        command: keys_cmd::KeysCommand,
    },
    /// List the gateway nodes sharing the PostgreSQL database, alive or gone.
    Nodes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the books: every license's balance against its history, and what its leases
    /// reserve against its lease rows (exit 1 naming each that does not add up).
    Books {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
        init_logging(None);
    }
    match cli.command {
        Command::CheckConfig => Ok(
            match Config::load(&cli.config).and_then(|c| {
                // the secrets `serve` would refuse to start with (from the environment, never shown)
                match tollgate::check_secrets(&admin::Secrets::from_env(), c.admin.listen) {
                    Ok(()) => Ok(c),
                    Err(e) => Err(gateway::config::ConfigErrors(vec![format!("secrets: {e}")])),
                }
            }) {
                Ok(c) if c.storage.backend == gateway::config::StoreKind::Postgres => {
                    // the URL may come from the environment: checked here, never printed
                    let checked = c.storage.database_url().and_then(|url| {
                        gateway::store::postgres::parse_url(&url)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    });
                    match checked {
                        Ok(()) => {
                            println!("{}: ok", cli.config.display());
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            let errors =
                                gateway::config::ConfigErrors(vec![format!("storage: {e}")]);
                            report_config_errors(&cli.config, &errors);
                            ExitCode::from(2)
                        }
                    }
                }
                Ok(c) => {
                    for note in c.notes() {
                        println!("note: {note}");
                    }
                    println!("{}: ok", cli.config.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    report_config_errors(&cli.config, &errors);
                    ExitCode::from(2)
                }
            },
        ),
        Command::Serve { upgrade } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            init_logging(Some(&config.log));
            let run = RunOptions {
                upgrade,
                alert_secret: std::env::var("TOLLGATE_ALERT_SECRET")
                    .ok()
                    .filter(|s| !s.is_empty()),
            };
            let secrets = admin::Secrets::from_env();
            tollgate::run(config, secrets, &run, tollgate::Start::default(), |_| {
                ops::notify_ready()
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { postgres } => {
            let config = if cli.config.exists() {
                let Some(c) = load_config(&cli.config) else {
                    return Ok(ExitCode::from(2));
                };
                c
            } else {
                Config::default()
            };
            init_logging(Some(&config.log));
            demo::run(config, postgres)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            if config.storage.backend == gateway::config::StoreKind::Postgres {
                // opening migrates, under the advisory lock every node takes
                let store = gateway::server::open_store(&config)?;
                println!("{}: schema up to date", store.describe());
                let metering = ops::set_metering(&config, &store);
                store.close();
                metering?;
                return Ok(ExitCode::SUCCESS);
            }
            let applied = gateway::store::migrate_sqlite(&config.storage.path)
                .with_context(|| format!("migrating {}", config.storage.path.display()))?;
            println!(
                "{}: {applied} migration(s) applied, schema up to date",
                config.storage.path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { pid } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            ops::reload(&cli.config, &config, pid)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { path } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            ops::backup(&config, &path)?;
            println!(
                "{}: backed up to {}",
                config.storage.path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            keys_cmd::run(&config, command)
        }
        Command::Nodes { json } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            nodes_cmd::run(&config, json)
        }
        Command::Books { json } => {
            let Some(config) = load_config(&cli.config) else {
                return Ok(ExitCode::from(2));
            };
            ops::books(&config, json)
        }
    }
}

fn load_config(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(errors) => {
            report_config_errors(path, &errors);
            None
        }
    }
}

fn report_config_errors(path: &Path, errors: &gateway::config::ConfigErrors) {
    eprintln!("{}: {} problem(s):", path.display(), errors.0.len());
    for e in &errors.0 {
        eprintln!("  {e}");
    }
}

/// Logs to stderr, as `[log]` says (text unless told otherwise); `RUST_LOG` overrides the level.
fn init_logging(log: Option<&gateway::config::LogConfig>) {
    use tracing_subscriber::EnvFilter;
    let level = log.map_or("info", |l| l.level.as_str());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // colours only for a person at a terminal: a log file or journald gets plain text
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if log.is_some_and(|l| l.json) {
        fmt.json().with_current_span(false).try_init()
    } else {
        fmt.try_init()
    };
}
