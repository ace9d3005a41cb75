//! Builds a VM from a [`VmConfig`] and runs it to its end, in one readable
//! sequence: check input, make guest memory, load the image, build the KVM
//! VM ([`builder`]), register the guest view with userfaultfd and build
//! the page engine (a node alone is a pod of one: the same engine, with no
//! fabric), start the pod (if there are other nodes) and the fault
//! handlers, start the vCPUs placed here ([`Vcpus`]), wait, stop
//! everything, report. A pod's other nodes run `pod::run_member`, which
//! builds the same VM and runs the vCPUs placed on them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::builder;
use crate::config::{self, Backing, ImageSource, VmConfig};
use crate::control::{Control, VmEvent};
use crate::devices::{Console, Devices, GuestInfo, GuestReader, IrqLine};
use crate::linux::BzEntry;
use crate::loader::{self, BootParams, BootPlan, LinuxEntry};
use crate::memory::{self, GuestMemory, Layout, PAGE_SIZE};
use crate::metrics::{self, NodeMetrics, Report};
use crate::pod::engine::handlers::FaultHandlers;
use crate::pod::engine::Engine as PodEngine;
use crate::uffd;
use crate::vcpu;
use crate::vcpus::Vcpus;

/// Errors before the guest runs. [`Error::is_bad_input`] tells the user's
/// mistakes (exit status 2) from the host's problems.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("guest image {path}: {source}")]
    ReadImage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] loader::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("reading the loaded guest memory back: {0}")]
    Loaded(#[source] std::io::Error),
    #[error("starting a thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Pod(#[from] crate::pod::Error),
    #[error(transparent)]
    Linux(#[from] crate::linux::Error),
    #[error(transparent)]
    Build(#[from] builder::Error),
    #[error("starting the vCPUs: {0}")]
    Start(String),
    #[error(transparent)]
    Virtio(#[from] crate::virtio::Error),
}

impl Error {
    /// Whether the user's input is at fault (as opposed to the host).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Config(_) | Error::ReadImage { .. } => true,
            Error::Virtio(e) => matches!(e, crate::virtio::Error::Disk(_)),
            Error::Linux(e) => !matches!(e, crate::linux::Error::Write(_)),
            Error::Pod(crate::pod::Error::Mismatch { .. } | crate::pod::Error::Refused(_)) => true,
            Error::Load(e) => !matches!(e, loader::Error::Write(_)),
            Error::Memory(e) => matches!(
                e,
                memory::Error::Zero
                    | memory::Error::Unaligned(_)
                    | memory::Error::TooSmall { .. }
                    | memory::Error::TooLarge { .. }
            ),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest called exit with this status.
    Exited(u64),
    /// The VM could not go on.
    Failed(String),
    /// `--timeout` expired.
    TimedOut(Duration),
    /// SIGINT or SIGTERM.
    Interrupted,
}

/// The end and the metrics.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub report: Report,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN (or out of a wait on a page
/// fault: KVM waits for userfaultfd interruptibly).
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the handlers for SIGINT/SIGTERM: the VM then ends cleanly, with
/// metrics (`End::Interrupted`). For `main`; a library user may keep its own.
pub fn install_interrupt_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_interrupt).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Installs the (empty) handler of the vCPU kick signal, once per process:
/// without it the signal's default action would kill the process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::Thread(std::io::Error::from_raw_os_error(errno)))
}

/// Runs a VM to its end.
pub fn run(config: &VmConfig, console_out: Box<dyn std::io::Write + Send>) -> Result<Outcome> {
    run_node(config, console_out, None)
}

/// How this node resolves the guest's faults: its page engine and the
/// threads that feed it, and on a pod of several nodes the receiver of
/// the other nodes' messages.
struct Paging {
    engine: Arc<PodEngine>,
    handlers: FaultHandlers,
    serving: Option<crate::pod::Serving>,
}

/// What [`check_input`] found: the image, its kind, whether the guest
/// gets a balloon.
struct Checked {
    name: String,
    bytes: Cow<'static, [u8]>,
    linux_kernel: Option<(std::path::PathBuf, crate::linux::Format)>,
    /// The vmlinux decompressed from a bzImage, to enter through its PVH
    /// entry (`--bzimage-entry`).
    vmlinux: Option<Vec<u8>>,
    balloon: bool,
}

/// Every check of the configuration and the image that needs no KVM, no
/// memory and no peer, for a VM over `nodes` nodes: a pod runs it before
/// it starts any node, so bad input ends it alone (exit status 2).
pub fn preflight(config: &VmConfig, nodes: u32) -> Result<()> {
    check_input(config, nodes, false).map(|_| ())
}

/// `load`: the VM is built next (a bzImage's vmlinux is decompressed for
/// `--bzimage-entry auto`; without it only `pvh` needs that, to be
/// refused early).
fn check_input(config: &VmConfig, nodes: u32, load: bool) -> Result<Checked> {
    config.check()?;
    config.check_disks()?;
    let (name, bytes): (String, Cow<'static, [u8]>) = match &config.image {
        ImageSource::Embedded(g) => (g.name.to_string(), Cow::Borrowed(g.elf)),
        ImageSource::File(path) => {
            let bytes = config::read_input_file(path, config::MAX_INPUT_FILE)
                .map_err(|source| Error::ReadImage { path: path.display().to_string(), source })?;
            (path.display().to_string(), Cow::Owned(bytes))
        }
    };
    let linux_kernel = match &config.image {
        ImageSource::File(path) => crate::linux::Format::of(&bytes)?.map(|f| (path.clone(), f)),
        ImageSource::Embedded(_) => None,
    };
    if config.initrd.is_some() && linux_kernel.is_none() {
        return Err(config::Error::Invalid(format!(
            "--initrd needs a Linux kernel (a bzImage, or an ELF vmlinux with a PVH entry); {name} is not one"
        ))
        .into());
    }
    if !config.disks.is_empty() && linux_kernel.is_none() {
        return Err(config::Error::Invalid(format!(
            "--disk needs a Linux kernel (virtio-blk is a Linux guest's device); {name} is not one"
        ))
        .into());
    }
    let linux = linux_kernel.is_some();
    let vmlinux = match (&linux_kernel, config.bzimage_entry) {
        (Some((_, crate::linux::Format::BzImage)), entry @ (BzEntry::Auto | BzEntry::Pvh))
            if load || entry == BzEntry::Pvh =>
        {
            match crate::linux::vmlinux_of_bzimage(&bytes) {
                Ok(v) => Some(v),
                Err(why) if entry == BzEntry::Auto => {
                    tracing::info!(kernel = %name, %why, "the bzImage's own decompressor will run in the guest");
                    None
                }
                Err(why) => {
                    return Err(config::Error::Invalid(format!(
                        "--bzimage-entry pvh: {name} cannot be entered through a PVH entry: {why}"
                    ))
                    .into())
                }
            }
        }
        _ => None,
    };
    if nodes > 1 && config.backing == Backing::Anonymous {
        return Err(config::Error::Invalid("a pod needs --memory-backing memfd".into()).into());
    }
    if !linux {
        // a unikernel: its ELF checked, and the floor of what it writes
        // against the memory bound (the exact count comes after loading)
        let image = loader::Image::parse(&name, &bytes)?;
        image.check_fits(&Layout::new(config.memory)?)?;
        if let Some(budget) = config.node_memory {
            if image.file_bytes() > budget {
                return Err(config::Error::Invalid(format!(
                    "--node-memory {budget} bytes is less than the {} bytes the guest image alone fills",
                    image.file_bytes()
                ))
                .into());
            }
        }
    }
    let balloon = match (config.balloon, linux, config.backing) {
        (Some(true), false, _) => {
            return Err(config::Error::Invalid(format!(
                "--balloon on needs a Linux kernel (virtio-balloon is a Linux guest's device); {name} is not one"
            ))
            .into())
        }
        (Some(true), true, Backing::Anonymous) => {
            return Err(config::Error::Invalid(
                "--balloon on needs --memory-backing memfd: the page engine makes freed pages dormant".into(),
            )
            .into())
        }
        (Some(true), true, Backing::Memfd) if !config.dormant => {
            return Err(config::Error::Invalid(
                "--balloon on makes freed pages dormant; with --dormant off no page is: leave one of them out".into(),
            )
            .into())
        }
        (Some(on), ..) => on,
        (None, linux, backing) => linux && backing == Backing::Memfd && config.dormant,
    };
    Ok(Checked { name, bytes, linux_kernel, vmlinux, balloon })
}

/// Runs the VM as node 0 of a pod joined through `pod` (None: alone):
/// builds it, then runs it.
pub fn run_node(
    config: &VmConfig,
    console_out: Box<dyn std::io::Write + Send>,
    pod: Option<&crate::pod::Link>,
) -> Result<Outcome> {
    build_node(config, console_out, pod)?.run()
}

/// Node 0's VM, built and not yet running: its memory loaded, its KVM VM,
/// page engine and fault handlers, devices and vCPUs (not started) and,
/// on a pod, every other node's VM built and serving. A member builds
/// its own the same way (`pod::MemberVm::build`), so that it can run the
/// vCPUs placed on it and those that move to it.
struct NodeVm<'a> {
    config: &'a VmConfig,
    pod: Option<&'a crate::pod::Link>,
    started: Instant,
    mem: Arc<GuestMemory>,
    plan: BootPlan,
    vcpus: Arc<Vcpus>,
    events: std::sync::mpsc::Receiver<VmEvent>,
    paging: Option<Paging>,
    virtio: Option<Arc<crate::virtio::VirtioDevices>>,
    console: Arc<Mutex<Console>>,
    /// The bytes of the vmlinux decompressed from a bzImage (0: none).
    vmlinux_bytes: u64,
    /// Pages the loader wrote all zeros, punched out (left dormant).
    loaded_zero: u64,
}

/// Checks the input, loads the guest and builds node 0's VM (and, on a
/// pod, has the other nodes build theirs): everything but running it.
fn build_node<'a>(
    config: &'a VmConfig,
    console_out: Box<dyn std::io::Write + Send>,
    pod: Option<&'a crate::pod::Link>,
) -> Result<NodeVm<'a>> {
    let started = Instant::now();
    let Checked { name, bytes, linux_kernel, vmlinux, balloon } =
        check_input(config, pod.map_or(1, |l| l.facts.nodes), true)?;
    if let Some(link) = pod {
        link.check_members()?;
    }
    install_kick_handler()?;
    let linux = linux_kernel.is_some();
    let mem = match pod {
        Some(link) if link.mem.layout().size() == Layout::new(config.memory)?.size() => link.mem.clone(),
        Some(_) => return Err(config::Error::Invalid("the pod's memory differs from --memory".into()).into()),
        None => Arc::new(GuestMemory::with_backing(Layout::new(config.memory)?, config.backing)?),
    };
    let num_nodes = pod.map_or(1, |l| l.facts.nodes);
    let placement = match pod {
        Some(link) => link.facts.placement.clone(),
        None => vcpu_placement(config, 1, linux)?,
    };
    let params = BootParams {
        cmdline: config.cmdline.clone(),
        vcpus: config.cpus,
        placement: placement.clone(),
        num_nodes: num_nodes.into(),
    };
    let plan = match &linux_kernel {
        Some((path, format)) => {
            let virtio = crate::virtio::VirtioDevices::count(config.disks.len(), balloon);
            let (initrd, cmdline) = (config.initrd.as_deref(), &config.cmdline);
            let mut kernel = match &vmlinux {
                Some(v) => crate::linux::Kernel::decompressed(path, v)?,
                None => crate::linux::Kernel::open(path, *format)?,
            };
            let l = crate::linux::load(&mut kernel, initrd, cmdline, config.cpus, virtio, &mem)?;
            BootPlan {
                // a Linux kernel is entered as `linux` says
                entry: 0,
                pml4: l.pml4,
                gdt: l.gdt,
                vcpus: Vec::new(),
                free_base: 0,
                linux: Some(LinuxEntry { entry: l.entry, stack: crate::linux::BOOT_STACK, no_xsave: config.no_xsave }),
            }
        }
        None => loader::load(&loader::Image::parse(&name, &bytes)?, &mem, &params)?,
    };

    // a Linux guest gets a PC's interrupt controllers and timer (in KVM)
    // and the serial port's interrupt on IRQ 4
    let built = builder::build(&mem, linux)?;
    let vm = Arc::new(built.vm);

    let (control, events) = Control::new();
    let control = Arc::new(control);
    let cpus = vcpu::allowed_cpus();
    let pin = config.pin.then_some(cpus.as_slice());
    let console = Arc::new(Mutex::new(Console::new(console_out)));
    let clock_start = Instant::now();
    let info = GuestInfo {
        num_vcpus: config.cpus.into(),
        node_id: 0,
        num_nodes: num_nodes.into(),
        mem_bytes: config.memory,
        clock_start,
    };
    // the engine is made first: the devices read guest memory through the
    // guest view it serves, and the vCPUs' faults go to it
    let engine = match (config.backing, pod) {
        (Backing::Memfd, pod) => Some(make_engine(config, pod, &mem, &control)?),
        (Backing::Anonymous, Some(_)) => {
            return Err(config::Error::Invalid("a pod needs --memory-backing memfd".into()).into())
        }
        (Backing::Anonymous, None) => None,
    };
    let loaded_zero = engine.as_ref().map_or(0, |(_, _, zeros)| *zeros);
    // its virtio devices (node 0's, in the slots the DSDT names); the
    // balloon frees through the engine (weakly held: the engine's vCPUs
    // hold the devices)
    let free = match (&engine, balloon) {
        (Some((e, _, _)), true) => {
            let pages: Arc<dyn crate::virtio::balloon::Pages> = Arc::new(BalloonPages(Arc::downgrade(e)));
            Some(pages)
        }
        _ => None,
    };
    let virtio = match config.disks.is_empty() && free.is_none() {
        true => None,
        false => Some(Arc::new(crate::virtio::VirtioDevices::new(&vm, &mem, &config.disks, free)?)),
    };
    let reader = match &engine {
        Some(_) => GuestReader::GuestView(mem.clone()),
        None => GuestReader::Direct(mem.clone()),
    };
    let devices = Devices::new(console.clone(), reader, info, IrqLine(built.serial_irq));
    // a Linux guest's ACPI tables name the PM1 registers (node 0 only:
    // its vCPUs run here)
    let devices = if linux { devices.with_acpi_pm() } else { devices };
    let devices = Arc::new(match &virtio {
        Some(v) => devices.with_virtio(v.clone()),
        None => devices,
    });
    if linux {
        forward_stdin(devices.clone());
    }
    let setup = crate::vcpus::Setup {
        me: 0,
        nodes: num_nodes,
        count: config.cpus,
        placement,
        migration: config.migration && !linux,
        irqchip: linux,
        linux,
        pin: pin.map(<[usize]>::to_vec),
    };
    let transport = pod.map(|l| l.transport.clone());
    let vcpus = Vcpus::new(setup, built.kvm, vm.clone(), devices, control.clone(), transport);
    let on_fatal = {
        let control = control.clone();
        Arc::new(move |e: String| control.fail(e))
    };
    let threads = config.fault_threads.unwrap_or(config.cpus as usize);
    let paging = match engine {
        Some((engine, loaded, _)) => {
            engine.set_vcpus(vcpus.clone());
            // the other nodes of a pod (none for a pod of one) build theirs
            let serving = match pod {
                Some(link) => {
                    let start_plan = crate::pod::StartPlan {
                        loaded,
                        boot: plan.clone(),
                        clock_ns: u64::try_from(clock_start.elapsed().as_nanos()).unwrap_or(u64::MAX),
                        wall_ns: crate::pod::wall_ns(),
                    };
                    // (before Start: no page or vCPU message can come before it)
                    let tap = crate::pod::PodTap::set(&*link.transport, &engine, &vcpus);
                    link.start(&start_plan, &engine, &vcpus)?;
                    Some(link.serve(engine.clone(), vcpus.clone(), tap).map_err(Error::Thread)?)
                }
                None => None,
            };
            let handlers = FaultHandlers::spawn(engine.clone(), threads, pin, on_fatal).map_err(Error::Thread)?;
            Some(Paging { engine, handlers, serving })
        }
        None => None,
    };

    let vmlinux_bytes = vmlinux.map_or(0, |v| v.len() as u64);
    Ok(NodeVm { config, pod, started, mem, plan, vcpus, events, paging, virtio, console, vmlinux_bytes, loaded_zero })
}

impl NodeVm<'_> {
    /// Starts the vCPUs, waits for the guest's end (or the pod's failure),
    /// stops everything and gathers every node's metrics.
    fn run(self) -> Result<Outcome> {
        let NodeVm {
            config,
            pod,
            started,
            mem,
            plan,
            vcpus,
            events,
            paging,
            virtio,
            console,
            vmlinux_bytes,
            loaded_zero,
        } = self;
        let setup_error = vcpus.start(&plan).err().map(Error::Start);
        let linux_vcpus = plan.linux.is_some().then_some(vcpus.as_ref());
        let end = setup_error.is_none().then(|| wait(&events, config, linux_vcpus));
        let failed = matches!(end, Some(End::Failed(_)));
        if let (Some(Paging { serving: Some(serving), .. }), Some(link)) = (&paging, pod) {
            // the end is decided: what stopping the vCPUs does to messages
            // still in flight is no failure of the pod
            link.quiesce(serving);
        }
        let uffd = paging.as_ref().and_then(|p| p.engine.uffd());
        let release = || {
            if let Some(uffd) = uffd {
                if let Err(e) = uffd.unregister(mem.guest_view_base(), mem.layout().size()) {
                    tracing::warn!(error = %e, "cannot unregister guest memory");
                }
            }
        };
        // after a failure at once; otherwise only if kicks alone have not
        // stopped every vCPU within 100 ms (see `Vcpus::stop`)
        let release_after = if failed { Duration::ZERO } else { Duration::from_millis(100) };
        vcpus.stop(release_after, &release);
        if let Some(v) = &virtio {
            v.stop();
        }
        let wall = started.elapsed();
        flush_console(&console);
        let mut others = Vec::new();
        let mut node = match paging {
            Some(Paging { engine, handlers, serving }) => {
                handlers.stop();
                let failure = match &end {
                    Some(End::Exited(_)) => None,
                    Some(End::Failed(why)) => Some(why.clone()),
                    Some(End::TimedOut(_)) => Some("the guest ran past --timeout".to_string()),
                    Some(End::Interrupted) => Some("interrupted".to_string()),
                    None => Some("the VM could not start".to_string()),
                };
                if let (Some(link), Some(serving)) = (pod, &serving) {
                    others = link.finish(serving, failure.as_deref());
                }
                engine.metrics()
            }
            None => {
                NodeMetrics { node: Some(0), pages_resident: mem.mapped_pages().unwrap_or(0), ..Default::default() }
            }
        };
        let end = match (end, setup_error) {
            (Some(end), None) => end,
            (_, Some(e)) => return Err(e),
            (None, None) => unreachable!("no end without a setup error"),
        };
        node.wall_seconds = wall.as_secs_f64();
        node.kernel_decompressed_bytes = vmlinux_bytes;
        node.pages_loaded_zero = loaded_zero;
        node.memfd_bytes = mem.allocated_bytes();
        node.peak_rss_bytes = metrics::peak_rss_bytes();
        vcpus.add_metrics(&mut node);
        let mut nodes = vec![node];
        nodes.extend(others);
        Ok(Outcome { end, report: Report::new(nodes) })
    }
}

/// Where the vCPUs start on a pod of `nodes`: `--placement`, or
/// contiguous blocks; a Linux guest runs every vCPU on node 0 (for now).
pub fn vcpu_placement(config: &VmConfig, nodes: u32, linux: bool) -> std::result::Result<Vec<u32>, config::Error> {
    if linux {
        if config.placement.iter().any(|&n| n != 0) {
            return Err(config::Error::Invalid(
                "a Linux guest runs every vCPU on node 0 for now: leave --placement out, or name node 0 only".into(),
            ));
        }
        return Ok(vec![0; config.cpus as usize]);
    }
    config::placement(config.cpus, nodes, &config.placement)
}

/// Writes out the console's last partial line, unless a vCPU left behind
/// (blocked writing to a stdout nobody reads) still holds it: then the line
/// is lost, but shoal does not hang.
fn flush_console(console: &Mutex<Console>) {
    for _ in 0..100 {
        match console.try_lock() {
            Ok(mut c) => return c.flush_line(),
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner().flush_line(),
            Err(std::sync::TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    tracing::warn!("the console is blocked; its last partial line is lost");
}

/// (offset, len) extents of guest memory.
type Extents = Vec<(u64, u64)>;

/// Node 0 of a pod, or a node alone (a pod of one, `pod` None): registers
/// the guest view with userfaultfd for missing, minor and write-protect
/// faults and builds the page engine (the loader's pages start owned
/// here; the all-zero ones it wrote are punched out first, to stay
/// dormant). Returns it with the loader's extents and how many zero pages
/// it punched.
fn make_engine(
    config: &VmConfig,
    pod: Option<&crate::pod::Link>,
    mem: &Arc<GuestMemory>,
    control: &Arc<Control>,
) -> Result<(Arc<PodEngine>, Extents, u64)> {
    let uffd = crate::pod::pod_uffd(mem)?;
    let zeros = mem.punch_zero_pages().map_err(Error::Loaded)?;
    let loaded = mem.populated_extents().map_err(Error::Loaded)?;
    let loaded_bytes: u64 = loaded.iter().map(|&(_, len)| len.div_ceil(PAGE_SIZE) * PAGE_SIZE).sum();
    if let Some(budget) = config.node_memory {
        if loaded_bytes > budget {
            return Err(config::Error::Budget { budget, needed: loaded_bytes }.into());
        }
    }
    let pages = mem.layout().pages();
    let settings = match pod {
        Some(link) => crate::pod::settings_for(&link.facts, pages, link.digests.clone()),
        None => crate::pod::settings_alone(config, pages),
    }
    .map_err(config::Error::Invalid)?;
    let on_fatal = {
        let control = control.clone();
        Arc::new(move |e: String| control.fail(e))
    };
    let transport = pod.map(|l| l.transport.clone());
    let engine = PodEngine::new(0, settings, transport, mem.clone(), Some(uffd), &loaded, on_fatal)
        .map_err(|e| Error::Pod(crate::pod::Error::Failed(e)))?;
    Ok((Arc::new(engine), loaded, zeros))
}

/// The balloon's way to the page engine (weakly held: the engine's vCPUs
/// hold the devices).
struct BalloonPages(std::sync::Weak<PodEngine>);

impl crate::virtio::balloon::Pages for BalloonPages {
    fn report(&self, pages: std::ops::Range<u64>) -> std::result::Result<(), String> {
        self.0.upgrade().ok_or("the VM is ending")?.report_free(pages)
    }
    fn free(&self, pages: std::ops::Range<u64>) -> std::result::Result<(), String> {
        self.0.upgrade().ok_or("the VM is ending")?.free_reported(pages)
    }
}

/// Forwards shoal's stdin to the guest's serial console, from a thread
/// that ends at end of input (and with the process otherwise).
fn forward_stdin(devices: Arc<Devices>) {
    let spawned = std::thread::Builder::new().name("shoal-stdin".into()).spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            devices.serial_input(&buf[..n]);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no console input: cannot start its thread");
    }
}

/// How often a Linux guest's vCPUs are asked whether they stopped for
/// good (`halt`): the VM ends within twice this after the guest halts.
const HALT_PROBE: Duration = Duration::from_millis(500);

/// Waits for the event that ends the VM. A Linux guest's vCPUs (`vcpus`)
/// are asked every [`HALT_PROBE`] whether they stopped for good: Linux's
/// `halt` stops every CPU with interrupts off, which KVM keeps inside
/// `KVM_RUN`, so no exit would ever tell; the VM then ends with status 0.
fn wait(events: &std::sync::mpsc::Receiver<VmEvent>, config: &VmConfig, vcpus: Option<&Vcpus>) -> End {
    let start = Instant::now();
    let mut halted = 0u32;
    let mut round = 0u64;
    let mut probed = start;
    loop {
        if let Some(v) = vcpus.filter(|_| probed.elapsed() >= HALT_PROBE) {
            if round > 0 && v.all_stopped(round) {
                tracing::info!("the guest halted every CPU with interrupts off; the VM ends");
                return End::Exited(0);
            }
            round += 1;
            v.probe_stopped(round);
            probed = Instant::now();
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            return End::Interrupted;
        }
        if let Some(t) = config.timeout {
            if start.elapsed() >= t {
                return End::TimedOut(t);
            }
        }
        match events.recv_timeout(Duration::from_millis(50)) {
            Ok(VmEvent::Exit { status, vcpu }) => {
                tracing::debug!(vcpu, status, "guest exit");
                return End::Exited(status);
            }
            Ok(VmEvent::Halted { vcpu }) => {
                tracing::debug!(vcpu, "vCPU halted");
                halted += 1;
                if halted == config.cpus {
                    return End::Failed("every vCPU halted without calling exit".into());
                }
            }
            // shoal does not restart a guest: a reset (`reboot`, a panic
            // with panic=-1) ends the VM with status 0, as a power-off does
            Ok(VmEvent::Reset { vcpu }) => {
                tracing::debug!(vcpu, "the guest reset the machine");
                return End::Exited(0);
            }
            Ok(VmEvent::PowerOff { vcpu }) => {
                tracing::debug!(vcpu, "the guest powered off");
                return End::Exited(0);
            }
            Ok(VmEvent::Failed(why)) => return End::Failed(why),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return End::Failed("lost the VM's event channel".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::tests::{bzimage_around, scratch_file, tiny_elf, xz};

    fn config_for(kernel: &std::path::Path, entry: BzEntry) -> VmConfig {
        let mut config = VmConfig::new(ImageSource::File(kernel.to_path_buf()), 256 << 20);
        config.bzimage_entry = entry;
        config
    }

    /// `auto` enters a bzImage through its vmlinux's PVH entry where it
    /// can and through the guest's decompressor where it cannot; `pvh`
    /// refuses the second; `boot64` never decompresses.
    #[test]
    fn a_bzimage_is_entered_as_bzimage_entry_says() {
        let elf = tiny_elf(Some(0x10_0040), true);
        let (xz_dir, xz_k) = scratch_file("entry-xz", "vmlinuz", &bzimage_around(&xz(&elf), 0x20f));
        let zstd = [&[0x28, 0xb5, 0x2f, 0xfd][..], &elf].concat();
        let (zstd_dir, zstd_k) = scratch_file("entry-zstd", "vmlinuz", &bzimage_around(&zstd, 0x20f));
        let vmlinux = |k: &std::path::Path, entry| check_input(&config_for(k, entry), 1, true).map(|c| c.vmlinux);
        assert_eq!(vmlinux(&xz_k, BzEntry::Auto).unwrap(), Some(elf.clone()));
        assert_eq!(vmlinux(&xz_k, BzEntry::Pvh).unwrap(), Some(elf.clone()));
        assert_eq!(vmlinux(&xz_k, BzEntry::Boot64).unwrap(), None);
        assert_eq!(vmlinux(&zstd_k, BzEntry::Auto).unwrap(), None);
        let refused = vmlinux(&zstd_k, BzEntry::Pvh).unwrap_err().to_string();
        assert!(refused.contains("(zstd) is not one shoal reads"), "{refused}");
        // before the VM is built (a pod's preflight) only pvh decompresses
        assert!(check_input(&config_for(&zstd_k, BzEntry::Pvh), 1, false).is_err());
        assert_eq!(check_input(&config_for(&xz_k, BzEntry::Auto), 1, false).unwrap().vmlinux, None);
        for dir in [xz_dir, zstd_dir] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
