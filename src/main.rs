//! The binary: flags, logging, config, run, exit code. Everything else is
//! in the library, except the client commands (`prompt`, `status`) in
//! `cli.rs`.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::EXIT_CONFIG;
use opencode_nats_bridge::config::{Config, LogFormat};
use opencode_nats_bridge::sandbox;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the daemon allocates many short-lived
/// buffers per reply on several threads, and glibc's arena consolidation
/// showed up at 9% of the daemon's CPU in the end-to-end benchmark
/// (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a failure at run time.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "opencode-nats-bridge",
    version,
    about = "Bridges NATS prompts to OpenCode turns"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (embedded defaults when no config file is given).
    ///
    /// Connects to NATS (`[nats] url`, default nats://127.0.0.1:4222,
    /// waiting for it unless `[nats] retry_on_initial_connect = false`),
    /// starts `opencode serve` in the current directory (or drives
    /// `[opencode] base_url`), and serves prompts on `[subjects] prompt`
    /// until SIGTERM or Ctrl-C, then drains. Its first log line names the
    /// config sources it read.
    ///
    /// Config: built-in defaults, then the `--config` file, then
    /// `OPENCODE_BRIDGE__<SECTION>__<KEY>` environment variables (e.g.
    /// OPENCODE_BRIDGE__NATS__URL). Exit status: 0 stopped by a signal;
    /// 1 a failure at run time; 78 bad config.
    #[command(
        after_help = "Example: opencode-nats-bridge run --config /etc/opencode-nats-bridge/config.toml"
    )]
    Run {
        /// A TOML config file (see config.example.toml); without it, the
        /// built-in defaults and the environment.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate a config file (with the environment) and exit.
    ///
    /// Reads what `run` would read (defaults, the file, the
    /// OPENCODE_BRIDGE__* environment), prints which of them it read, and
    /// names the key and the source of the first mistake. Exit status: 0
    /// valid; 78 not.
    CheckConfig {
        /// The TOML config file to check (see config.example.toml); without
        /// it, the built-in defaults and the environment.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Send one prompt over NATS and print the answer as it streams.
    ///
    /// The answer goes to stdout as it arrives; reasoning and tool activity
    /// to stderr (dimmed on a terminal); `--json` prints every reply
    /// instead. Ctrl-C aborts the turn (a second one exits at once).
    ///
    /// Exit status: 0 `final`; 2 `error` reply; 3 no terminal reply within
    /// `--timeout`; 1 NATS unreachable, no bridge listening, or the prompt
    /// refused by NATS permissions; 130 interrupted; 64 no prompt text or
    /// bad usage; 78 bad config.
    #[command(
        after_help = "Example: opencode-nats-bridge prompt --conversation me 'What is 2+2?'"
    )]
    Prompt(cli::PromptArgs),
    /// List every running daemon (its status endpoint), with health and load.
    ///
    /// Exit status: 0 when at least one answered; 3 when none did; 1 NATS
    /// unreachable; 78 bad config.
    Status(cli::StatusArgs),
    /// A turn's state (queued, running, done, unknown) and its terminal
    /// reply, fetched again by trace id (needs a daemon with JetStream).
    ///
    /// Exit status: 0 answered (the state on the first line, then the
    /// terminal reply as one JSON line); 3 no daemon answered; 1 NATS
    /// unreachable or the request refused by NATS permissions; 64 bad
    /// usage; 78 bad config.
    Turn(cli::TurnArgs),
    /// Conversation controls: `new`, `undo`, `redo`, `compact`, `diff`,
    /// `fork`, `history`, `list`, `info` (docs/PROTOCOL.md).
    #[command(flatten)]
    Control(cli::ControlCommand),
}

fn main() -> ExitCode {
    if let Some(failed) = sandbox_helper() {
        return failed;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(cli::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Prompt(args) => {
            init_client_tracing();
            cli::prompt(args)
        }
        Command::Status(args) => {
            init_client_tracing();
            cli::status(args)
        }
        Command::Turn(args) => {
            init_client_tracing();
            cli::turn(args)
        }
        Command::Control(cmd) => {
            init_client_tracing();
            cli::control(cmd)
        }
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Run { config } => {
            let (cfg, sources) = match Config::load_with_sources(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(&cfg);
            log_build_and_config(&sources);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let served = rt.block_on(async {
                // Handlers first: a SIGTERM right after READY=1 (or during
                // startup) must start a graceful stop, not kill the process.
                let shutdown = shutdown_signal();
                opencode_nats_bridge::app::run(cfg, shutdown, None).await
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "exiting");
                    if e.is_config() {
                        ExitCode::from(EXIT_CONFIG)
                    } else {
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            }
        }
    }
}

/// The hidden `sandbox-exec` subcommand (src/sandbox/): confine this
/// process, then become the command. Checked first, while the process has
/// a single thread (a user namespace needs that). Returns only on failure.
fn sandbox_helper() -> Option<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != sandbox::SUBCOMMAND) {
        return None;
    }
    let error = sandbox::sandbox_exec(&args[2..]);
    eprintln!("{error}");
    Some(ExitCode::from(sandbox::EXIT_SANDBOX))
}

/// `check-config`: the config, then (with `[isolation] mode =
/// "sandbox"`) the kernel check of `run`, so ExecStartPre catches both.
fn check_config(path: Option<&std::path::Path>) -> ExitCode {
    let checked = Config::load_with_sources(path).and_then(|(cfg, sources)| {
        sandbox::check_at_start(&cfg.isolation)
            .map(|()| sources)
            .map_err(
                |reason| opencode_nats_bridge::config::ConfigError::Invalid {
                    key: "isolation.mode",
                    reason,
                },
            )
    });
    match checked {
        Ok(sources) => {
            println!("config OK; read: {sources}");
            for note in &sources.renamed {
                println!("warning: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn init_tracing(cfg: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| !spec.trim().is_empty())
        .and_then(|spec| EnvFilter::try_new(quiet_nats(&spec)).ok())
        .or_else(|| EnvFilter::try_new(quiet_nats(&cfg.log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new(quiet_nats("info")));
    let colour = colour();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(opencode_nats_bridge::ops::log::SafeStderr {
            style: opencode_nats_bridge::protocol::logsafe::LineStyle {
                keep_esc: colour,
                json: cfg.log.format == LogFormat::Json,
            },
        });
    match cfg.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// async-nats logs every connection event at info, and the bus logs each
/// one again with more context: keep async-nats to warnings unless the
/// filter names it.
fn quiet_nats(spec: &str) -> String {
    if spec.contains("async_nats") {
        spec.to_string()
    } else {
        format!("{spec},async_nats=warn")
    }
}

/// ANSI colour only on a terminal, and never with `NO_COLOR` set
/// (no-color.org): a file or journald gets plain text.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The client commands log only when `RUST_LOG` asks for it.
fn init_client_tracing() {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour())
            .with_writer(std::io::stderr)
            .init();
    }
}

/// What the operator should know before the daemon starts: where its
/// config came from (the file, the environment variables), keys read under
/// an old name, and which runtime this build has.
fn log_build_and_config(sources: &opencode_nats_bridge::config::Sources) {
    tracing::info!("config: read {sources}");
    for note in &sources.renamed {
        tracing::warn!("config: {note}");
    }
    tracing::info!(
        lifo_slot = !cfg!(tokio_unstable),
        "runtime: multi-thread tokio{}",
        if cfg!(tokio_unstable) {
            ", LIFO slot off"
        } else {
            " with its LIFO slot (built without .cargo/config.toml's tokio_unstable: more CPU per reply)"
        }
    );
}

/// The daemon's runtime: multi-thread, without tokio's LIFO slot where
/// the build allows (`.cargo/config.toml`). With the slot, each reply a
/// turn task published put the NATS connection task in the slot, which ran
/// it next: one `writev` per reply, and a wake-up of the other worker for
/// each. Without it, the replies of all the turns an event burst woke go
/// out together (docs/BENCHMARKS.md, "The raw path round").
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            tracing::warn!("cannot handle SIGTERM/SIGINT; stop the daemon with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
