//! `shoal`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_vmm::config::{self, ImageSource, VmConfig};
use shoal_vmm::vm::{self, End};

/// Exit status for bad input (usage, sizes, images, command lines).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when this host cannot run the VM (no /dev/kvm, ...).
const EXIT_HOST: u8 = 1;
/// Exit status when the VM failed while running.
const EXIT_VM_FAILED: u8 = 70;
/// Exit status when --timeout expired.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status after SIGINT/SIGTERM.
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "A distributed, unikernel-style hypervisor", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it to its end; shoal exits with the guest's status.
    #[command(after_help = "Exit status: the guest's (0-255) when it exits; 2 bad input; 1 the host \
                            cannot run the VM; 70 the VM failed; 124 --timeout; 130 interrupted.")]
    Run(RunArgs),
    /// List the guests built into shoal, or write them out as ELF files.
    Guests {
        /// Write every guest to DIR/NAME.elf.
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
#[group(id = "image", required = true, multiple = false)]
struct ImageArgs {
    /// A guest built into shoal (see `shoal guests`).
    #[arg(long, value_name = "NAME", group = "image")]
    guest: Option<String>,
    /// A 64-bit x86-64 ELF guest image file (the shoal guest ABI).
    #[arg(long, value_name = "PATH", group = "image")]
    kernel: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackingArg {
    /// A sparse memfd under shoal's pager (dormant pages).
    Memfd,
    /// Plain anonymous memory, no pager: the kernel serves first touches.
    /// The benchmarks' baseline; the page counters stay 0.
    Anonymous,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Guest RAM, e.g. 64M, 4G (binary units; a bare number is bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// The guest's command line, e.g. "mib=64 seed=7".
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,
    /// Dormant pages: off treats every page as having contents, to measure
    /// what dormant pages save.
    #[arg(long, value_name = "on|off", default_value = "on")]
    dormant: OnOff,
    /// Most guest memory this node may hold; a fault beyond it ends the VM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    node_memory: Option<u64>,
    /// Write the metrics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    metrics_json: Option<PathBuf>,
    /// Pin vCPU i and fault handler i together on host CPU i (benchmarks).
    #[arg(long)]
    pin: bool,
    /// End the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Fault-handler threads (default: one per vCPU).
    #[arg(long, value_name = "N")]
    fault_threads: Option<usize>,
    /// How guest RAM is backed.
    #[arg(long, value_name = "KIND", default_value = "memfd")]
    memory_backing: BackingArg,
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Guests { export } => guests(export),
        Command::Run(args) => run(args),
    }
}

fn bad_input(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("shoal: error: {msg}");
    ExitCode::from(EXIT_BAD_INPUT)
}

fn guests(export: Option<PathBuf>) -> ExitCode {
    let Some(dir) = export else {
        for g in shoal_guest_images::GUESTS {
            let params: Vec<String> =
                g.params.iter().map(|p| format!("{}=N ({}, default {})", p.key, p.help, p.default)).collect();
            println!("{:<10} {}", g.name, g.summary);
            if !params.is_empty() {
                println!("{:<10} cmdline: {}", "", params.join("; "));
            }
        }
        return ExitCode::SUCCESS;
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return bad_input(format_args!("--export {}: {e}", dir.display()));
    }
    for g in shoal_guest_images::GUESTS {
        let path = dir.join(format!("{}.elf", g.name));
        if let Err(e) = std::fs::write(&path, g.elf) {
            return bad_input(format_args!("writing {}: {e}", path.display()));
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let image = match (&args.image.guest, &args.image.kernel) {
        (Some(name), _) => match config::find_guest(name) {
            Ok(g) => ImageSource::Embedded(g),
            Err(e) => return bad_input(e),
        },
        (None, Some(path)) => ImageSource::File(path.clone()),
        (None, None) => unreachable!("clap requires --guest or --kernel"),
    };
    let timeout = match args.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => return bad_input(format_args!("--timeout must be a positive number of seconds, not {t}")),
    };
    let mut config = VmConfig::new(image, args.memory);
    config.cpus = args.cpus;
    config.cmdline = args.cmdline;
    config.dormant = args.dormant == OnOff::On;
    config.node_memory = args.node_memory;
    config.pin = args.pin;
    config.timeout = timeout;
    config.fault_threads = args.fault_threads;
    config.backing = match args.memory_backing {
        BackingArg::Memfd => config::Backing::Memfd,
        BackingArg::Anonymous => config::Backing::Anonymous,
    };
    if config.fault_threads == Some(0) {
        return bad_input("--fault-threads must be at least 1");
    }

    if let Err(e) = vm::install_interrupt_handlers() {
        eprintln!("shoal: error: installing signal handlers: {e}");
        return ExitCode::from(EXIT_HOST);
    }
    let outcome = match vm::run(&config, Box::new(std::io::stdout())) {
        Ok(o) => o,
        Err(e) if e.is_bad_input() => return bad_input(e),
        Err(e) => {
            eprintln!("shoal: error: {}", error_chain(&e));
            return ExitCode::from(EXIT_HOST);
        }
    };
    eprintln!("{}", outcome.report.summary());
    if let Some(path) = &args.metrics_json {
        let json = serde_json::to_string_pretty(&outcome.report).expect("metrics serialise");
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("shoal: error: writing metrics to {}: {e}", path.display());
            return ExitCode::from(EXIT_HOST);
        }
    }
    match outcome.end {
        End::Exited(status) => match u8::try_from(status) {
            Ok(s) => ExitCode::from(s),
            Err(_) => {
                eprintln!("shoal: the guest exited with status {status}, which does not fit in 0-255");
                ExitCode::from(EXIT_VM_FAILED)
            }
        },
        End::Failed(why) => {
            eprintln!("shoal: error: the VM failed: {why}");
            ExitCode::from(EXIT_VM_FAILED)
        }
        End::TimedOut(t) => {
            eprintln!("shoal: error: the guest ran past --timeout {:.1} s; stopped it", t.as_secs_f64());
            ExitCode::from(EXIT_TIMEOUT)
        }
        End::Interrupted => {
            eprintln!("shoal: interrupted; stopped the VM");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
