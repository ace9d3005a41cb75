//! The vCPUs one node hosts, and what vCPUs ask of each other across
//! nodes: inter-processor interrupts, migrations, and where each vCPU is.
//!
//! Every node of a pod (and a VM alone, a pod of one) has one [`Vcpus`].
//! Where every vCPU is and the IPI mailboxes of the vCPUs here are its
//! [`Roster`] (the I/O-free protocol, model-checked in
//! `shoal_protocol::roster_model`); this file carries out the roster's
//! actions and keeps, for the vCPUs here, their thread and the KVM vCPU
//! that runs them. A vCPU that leaves keeps its KVM vCPU here (KVM cannot
//! create one id twice), ready for the day it comes back.
//!
//! Messages between nodes (channel [`CHANNEL_VCPU`]) rely on the fabric's
//! per-pair order, which every backend has (one stream, or one RC queue
//! pair, per pair of nodes): a vCPU's state reaches its new node before
//! any IPI its old node forwards after it.
//!
//! - **IPI**: to the node the sender believes holds the target; a node
//!   that no longer holds it forwards it to where it sent it.
//! - **Migration**: the vCPU's thread leaves `KVM_RUN`, completes the
//!   pending port I/O (an `immediate_exit` run), captures the whole state
//!   ([`VcpuState`]), and, under the roster's lock, leaves (the roster
//!   takes the posted IPIs into the state and names the target, so later
//!   IPIs are forwarded behind it) and sends it, with the page under its
//!   stack pointer; the target's receiver tells its roster, asks the page
//!   engine for that page, and hands the state to the vCPU's thread there
//!   (kept from an earlier visit, or started), which restores it into the
//!   node's KVM vCPU of that id and runs it; every other node learns
//!   where the vCPU is now (`Location`, with a count of moves so a late,
//!   older location never wins).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::MutexGuard;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::vcpu::stats::{RunMark, VcpuStat, DONE_STATS};
use serde::{Deserialize, Serialize};
use shoal_fabric::Transport;
use shoal_protocol::roster::{RAction, RMsg, Roster};
use shoal_protocol::NodeId;
use vmm_sys_util::signal::Killable;

use crate::control::{Control, VmEvent};
use crate::devices::Devices;
use crate::loader::BootPlan;
use crate::metrics::FaultLatency;
use crate::pod::policy::Policy;
use crate::vcpu::state::{Sync, VcpuState};
use crate::vcpu::{self, Leave, Vcpu};

/// The first byte of a message about vCPUs.
pub const CHANNEL_VCPU: u8 = 2;

/// What nodes tell each other about vCPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuMsg {
    /// The vCPU is about to move to the receiver (its state follows):
    /// the guest-physical page under its stack pointer, which it will most
    /// likely write first there. The receiver asks for the page at once,
    /// while the sender captures the state and sends it.
    Coming { vcpu: u32, stack_page: u64 },
    /// The vCPU moves to the receiver: its state ([`VcpuState::encode`]).
    Migrate { vcpu: u32, moves: u64, state: Vec<u8> },
    /// The vCPU is on `node` now, after `moves` moves.
    Location { vcpu: u32, node: NodeId, moves: u64 },
    /// An inter-processor interrupt for the vCPU.
    Ipi { vcpu: u32 },
    /// node → node 0: bytes for the console (a vCPU here printed them).
    Print { bytes: Vec<u8> },
    /// node → node 0: something a vCPU here did that ends it or the VM.
    Event { event: VmEvent },
}

impl VcpuMsg {
    /// The message with its channel byte, for the fabric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CHANNEL_VCPU];
        out.extend(bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("vCPU messages encode"));
        out
    }

    /// A message a peer sent (without its channel byte).
    pub fn decode(from: NodeId, body: &[u8]) -> Result<VcpuMsg, String> {
        let config = bincode::config::standard().with_limit::<{ shoal_fabric::MAX_MESSAGE }>();
        match bincode::serde::decode_from_slice(body, config) {
            Ok((msg, used)) if used == body.len() => Ok(msg),
            Ok(_) => Err(format!("node {from} sent a vCPU message with bytes left over")),
            Err(e) => Err(format!("node {from} sent a malformed vCPU message: {e}")),
        }
    }
}

/// Counters of this node's vCPU traffic.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub migrations_in: AtomicU64,
    pub migrations_out: AtomicU64,
    pub ipis_sent: AtomicU64,
    pub ipis_received: AtomicU64,
    pub exits: AtomicU64,
    /// How long capturing a leaving vCPU's state took (with the port I/O
    /// it completes), and restoring an arriving one's: the part of a move
    /// that is KVM ioctls.
    pub capture: Mutex<FaultLatency>,
    pub restore: Mutex<FaultLatency>,
}

/// One vCPU, as this node runs it.
#[derive(Debug, Default)]
struct Slot {
    /// Rung when IPIs are posted to it here (waits on the roster's lock).
    bell: Condvar,
    /// A policy decision: move to this node (u32::MAX: none).
    move_to: AtomicU32,
    /// The thread running it here (its kernel tid while in the guest).
    thread: Mutex<Option<JoinHandle<()>>>,
    tid: AtomicI32,
    /// The KVM vCPU of this id on this node, while no thread runs it, with
    /// the CPUID set in it.
    parked: Mutex<Option<Parked>>,
    /// A state that arrived for the thread here, which waits for it after
    /// its vCPU left (a thread per vCPU and node, kept: starting one took
    /// 60 to 90 µs of every move).
    arrival: Mutex<Option<Box<VcpuState>>>,
    door: Condvar,
    /// The round of [`Vcpus::probe_stopped`] the thread is asked to answer
    /// (0: none asked), and the last round it found its vCPU stopped for
    /// good in.
    probe: AtomicU64,
    stopped: AtomicU64,
    /// KVM's counts of this vCPU's exits and of its halts and port I/O
    /// ([`DONE_STATS`]) on this node (one KVM vCPU per id and node, made
    /// once): the page engine's holds read them.
    stats: std::sync::OnceLock<HoldStats>,
}

/// A vCPU's `exits` and [`DONE_STATS`], where the kernel has them.
type HoldStats = (Option<Arc<VcpuStat>>, Option<Arc<VcpuStat>>);

/// A KVM vCPU this node keeps while its vCPU runs elsewhere (KVM cannot
/// create one id twice), with the state it holds: what was captured when
/// the vCPU left (an arrival sets only what differs from it).
#[derive(Debug)]
struct Parked {
    fd: VcpuFd,
    held: Box<VcpuState>,
}

const NO_MOVE: u32 = u32::MAX;

/// What a vCPU thread starts with.
enum First {
    /// A vCPU set up at its entry (placed here at boot).
    Boot(Vcpu),
    /// A vCPU that moved here: its state, to restore.
    Arrived(Box<VcpuState>),
}

/// The vCPUs of one node.
pub struct Vcpus {
    me: NodeId,
    nodes: u32,
    /// Where every vCPU is, and the mailboxes of those here. Sends of its
    /// actions happen under its lock: a vCPU's state leaves before any
    /// IPI forwarded after it.
    roster: Mutex<Roster>,
    slots: Vec<Slot>,
    /// Whether the policy may move vCPUs (`--migration on`); the guest's
    /// own migration hypercall works either way.
    migration: bool,
    kvm: Kvm,
    vm: Arc<VmFd>,
    /// The VM has an in-kernel interrupt controller (local APICs).
    irqchip: bool,
    linux: bool,
    devices: Arc<Devices>,
    control: Arc<Control>,
    transport: Option<Arc<dyn Transport>>,
    pin: Option<Vec<usize>>,
    policy: Mutex<Policy>,
    tids: Mutex<HashMap<i32, u32>>,
    /// The MSRs a migration saves (KVM's list, read once).
    msr_list: Vec<u32>,
    /// How registers reach us at exits and migrations.
    sync: Sync,
    /// MSRs KVM refused to set on an arriving vCPU (not tried again).
    msr_refused: Mutex<Vec<u32>>,
    pub counters: VcpuCounters,
}

impl std::fmt::Debug for Vcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpus").field("me", &self.me).field("vcpus", &self.slots.len()).finish_non_exhaustive()
    }
}

/// Settings of a node's vCPUs.
#[derive(Debug)]
pub struct Setup {
    pub me: NodeId,
    pub nodes: u32,
    pub count: u32,
    /// Each vCPU's first node.
    pub placement: Vec<NodeId>,
    pub migration: bool,
    pub irqchip: bool,
    pub linux: bool,
    /// Host CPUs to pin vCPU threads to (vCPU i on `pin[i % len]`).
    pub pin: Option<Vec<usize>>,
}

impl Vcpus {
    pub fn new(
        setup: Setup,
        kvm: Kvm,
        vm: Arc<VmFd>,
        devices: Arc<Devices>,
        control: Arc<Control>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Arc<Self> {
        // an empty list only makes migrations fail loudly where KVM would
        // not read MSRs (KVM_GET_MSR_INDEX_LIST cannot fail on x86)
        let msr_list = kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
        let sync = Sync::probe(&kvm);
        let slots = (0..setup.count)
            .map(|_| {
                let s = Slot::default();
                s.move_to.store(NO_MOVE, Ordering::Relaxed);
                s
            })
            .collect();
        let mut placement = setup.placement.clone();
        placement.resize(setup.count as usize, 0);
        Arc::new(Vcpus {
            me: setup.me,
            nodes: setup.nodes,
            roster: Mutex::new(Roster::new(setup.me, setup.nodes, &placement)),
            slots,
            migration: setup.migration,
            kvm,
            vm,
            irqchip: setup.irqchip,
            linux: setup.linux,
            devices,
            control,
            transport,
            pin: setup.pin,
            policy: Mutex::new(Policy::new(setup.count)),
            tids: Mutex::new(HashMap::new()),
            msr_list,
            sync,
            msr_refused: Mutex::new(Vec::new()),
            counters: VcpuCounters::default(),
        })
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.me
    }

    /// Nodes in the pod.
    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// vCPUs in the VM.
    pub fn count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The VM's devices as this node has them.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// How the VM's end is reported on this node.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    fn roster(&self) -> MutexGuard<'_, Roster> {
        self.roster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPUs on this node now.
    pub fn here(&self) -> u64 {
        let r = self.roster();
        (0..self.count()).filter(|&v| r.here(v)).count() as u64
    }

    /// Adds this node's vCPU counters to its metrics.
    pub fn add_metrics(&self, m: &mut crate::metrics::NodeMetrics) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        m.vcpus = self.here();
        m.vcpu_exits = get(&c.exits);
        m.vcpu_migrations_in = get(&c.migrations_in);
        m.vcpu_migrations_out = get(&c.migrations_out);
        m.ipis_sent = get(&c.ipis_sent);
        m.ipis_received = get(&c.ipis_received);
        m.vcpu_capture_us_p50 = c.capture.lock().unwrap_or_else(|p| p.into_inner()).quantile_us(0.5);
        m.vcpu_restore_us_p50 = c.restore.lock().unwrap_or_else(|p| p.into_inner()).quantile_us(0.5);
    }

    /// Starts the vCPUs placed on this node at the entry `plan` describes.
    pub fn start(self: &Arc<Self>, plan: &BootPlan) -> Result<(), String> {
        for id in 0..self.count() {
            if !self.roster().here(id) {
                continue;
            }
            let fd = self.vm.create_vcpu(u64::from(id)).map_err(|e| format!("cannot create vCPU {id}: {e}"))?;
            self.slots[id as usize].stats.get_or_init(|| Self::stats_of(&fd));
            let vcpu =
                Vcpu::new(u64::from(id), fd, &self.kvm, plan, self.sync, self.clone()).map_err(|e| e.to_string())?;
            self.spawn(id, First::Boot(vcpu))?;
        }
        Ok(())
    }

    /// Starts vCPU `id`'s thread on this node, which runs it (and, after it
    /// leaves, waits for it to come back).
    fn spawn(self: &Arc<Self>, id: u32, first: First) -> Result<(), String> {
        let host = self.clone();
        let cpu = self.pin.as_ref().map(|c| c[id as usize % c.len()]);
        let t = std::thread::Builder::new()
            .name(format!("shoal-vcpu{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = vcpu::pin_current_thread(cpu) {
                        tracing::warn!(error = %e, "running unpinned");
                    }
                }
                host.run(id, first)
            })
            .map_err(|e| format!("cannot start vCPU {id}'s thread: {e}"))?;
        *self.slots[id as usize].thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(())
    }

    /// A vCPU thread: runs vCPU `id` while it is here; when it leaves,
    /// waits for it to come back, until the VM ends.
    fn run(self: Arc<Self>, id: u32, first: First) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let slot = &self.slots[id as usize];
        let mut next = Some(first);
        while let Some(first) = next.take() {
            let mut vcpu = match first {
                First::Boot(vcpu) => vcpu,
                First::Arrived(state) => match self.arrive(id, &state) {
                    Ok(vcpu) => vcpu,
                    Err(why) => {
                        self.control.fail(format_args!("vCPU {id} arriving on node {}: {why}", self.me));
                        return;
                    }
                },
            };
            slot.tid.store(tid, Ordering::Release);
            self.tids.lock().unwrap_or_else(|p| p.into_inner()).insert(tid, id);
            let leave = vcpu.run();
            self.tids.lock().unwrap_or_else(|p| p.into_inner()).remove(&tid);
            slot.tid.store(0, Ordering::Release);
            self.counters.exits.fetch_add(vcpu.take_exits(), Ordering::Relaxed);
            match leave {
                Leave::Stopped => {}
                Leave::Failed(why) => self.control.fail(format_args!("vCPU {id} on node {}: {why}", self.me)),
                Leave::Migrate(to) => match self.herald(&mut vcpu, to).and_then(|()| self.emigrate(vcpu, to)) {
                    Ok(()) => next = self.await_return(id).map(First::Arrived),
                    Err(why) => {
                        self.control.fail(format_args!("vCPU {id} moving from node {} to node {to}: {why}", self.me))
                    }
                },
            }
        }
    }

    /// Waits for vCPU `id` to come back to this node (None: the VM ends).
    fn await_return(&self, id: u32) -> Option<Box<VcpuState>> {
        let slot = &self.slots[id as usize];
        let mut arrival = slot.arrival.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(state) = arrival.take() {
                return Some(state);
            }
            if self.control.stopping() {
                return None;
            }
            // `stop` rings the door; the slice is a safety net
            arrival = slot.door.wait_timeout(arrival, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Restores an arrived state into this node's KVM vCPU of that id (on
    /// the vCPU's thread: the receiver goes on meanwhile).
    fn arrive(self: &Arc<Self>, id: u32, state: &VcpuState) -> Result<Vcpu, String> {
        let parked = self.slots[id as usize].parked.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (mut fd, held) = match parked {
            Some(p) => (p.fd, Some(p.held)),
            None => (self.vm.create_vcpu(u64::from(id)).map_err(|e| format!("cannot create vCPU {id}: {e}"))?, None),
        };
        self.slots[id as usize].stats.get_or_init(|| Self::stats_of(&fd));
        let mut refused = self.msr_refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let before = refused.len();
        let t0 = Instant::now();
        state.restore(&mut fd, held.as_deref(), self.sync, &mut refused).map_err(|e| e.to_string())?;
        self.counters.restore.lock().unwrap_or_else(|p| p.into_inner()).record(t0.elapsed());
        if refused.len() > before {
            *self.msr_refused.lock().unwrap_or_else(|p| p.into_inner()) = refused;
        }
        Ok(Vcpu::resume(u64::from(id), fd, self.linux, state, self.sync, self.clone()))
    }

    // ---- guest requests ------------------------------------------------

    /// `HC_IPI`: interrupts vCPU `target` wherever it is; u64::MAX when
    /// there is no such vCPU.
    pub fn send_ipi(&self, target: u64) -> u64 {
        let Ok(target) = u32::try_from(target) else { return u64::MAX };
        let mut r = self.roster();
        let Some(acts) = r.ipi(target) else { return u64::MAX };
        self.carry_out(&r, acts, false);
        0
    }

    /// Carries out roster actions (under the roster's lock `_r`: sends
    /// keep their order against a vCPU leaving). `remote`: they answer a
    /// message (a posted IPI came from another node).
    fn carry_out(&self, _r: &Roster, acts: Vec<RAction>, remote: bool) {
        for a in acts {
            match a {
                RAction::Send { to, msg } => {
                    let msg = match msg {
                        RMsg::Ipi { vcpu } => {
                            if !remote {
                                self.counters.ipis_sent.fetch_add(1, Ordering::Relaxed);
                            }
                            VcpuMsg::Ipi { vcpu }
                        }
                        RMsg::Location { vcpu, node, moves } => VcpuMsg::Location { vcpu, node, moves },
                        RMsg::Migrate { .. } => unreachable!("a migration is sent by emigrate, with the state"),
                    };
                    self.send(to, &msg);
                }
                RAction::Posted { vcpu } => {
                    if remote {
                        self.counters.ipis_received.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(s) = self.slots.get(vcpu as usize) {
                        s.bell.notify_all();
                    }
                }
                // the caller starts it
                RAction::Arrived { .. } => {}
            }
        }
    }

    /// `HC_WAIT_IPI`: sleeps until an IPI is posted for `vcpu` (or
    /// `timeout_ns` passes, 0 = no limit, or the VM stops); takes and
    /// returns the IPIs posted (0 after a timeout).
    pub fn wait_ipi(&self, vcpu: u64, timeout_ns: u64) -> u64 {
        let Some(slot) = self.slots.get(vcpu as usize) else { return u64::MAX };
        let vcpu = vcpu as u32;
        let deadline = (timeout_ns > 0).then(|| Instant::now() + Duration::from_nanos(timeout_ns));
        let mut r = self.roster();
        loop {
            let got = r.take(vcpu);
            if got > 0 {
                return got;
            }
            if self.control.stopping() || deadline.is_some_and(|d| Instant::now() >= d) {
                return 0;
            }
            // wake now and then to notice the VM stopping
            let slice = Duration::from_millis(20);
            let slice = deadline.map_or(slice, |d| slice.min(d.saturating_duration_since(Instant::now())));
            r = slot.bell.wait_timeout(r, slice).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Asks every vCPU here whether it is stopped for good (`hlt` with
    /// interrupts off, or never started by the guest), the question's
    /// round `round`, counted from 1. The threads answer at their next
    /// return from `KVM_RUN` (this kicks them out of it).
    pub fn probe_stopped(&self, round: u64) {
        for s in &self.slots {
            s.probe.store(round, Ordering::Release);
            if let Some(t) = s.thread.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = t.kill(crate::vm::kick_signal());
            }
        }
    }

    /// Whether every vCPU here answered round `round` stopped for good.
    pub fn all_stopped(&self, round: u64) -> bool {
        self.slots.iter().all(|s| s.stopped.load(Ordering::Acquire) == round)
    }

    /// The round of the stop question `vcpu`'s thread is to answer (taken
    /// once; None when nothing is asked).
    pub fn take_probe(&self, vcpu: u64) -> Option<u64> {
        let round = self.slots.get(vcpu as usize)?.probe.swap(0, Ordering::AcqRel);
        (round != 0).then_some(round)
    }

    /// `vcpu`'s thread found it stopped for good in round `round`.
    pub fn answer_stopped(&self, vcpu: u64, round: u64) {
        if let Some(s) = self.slots.get(vcpu as usize) {
            s.stopped.store(round, Ordering::Release);
        }
    }

    /// Whether the policy asked vCPU `vcpu` to move (taken once).
    pub fn take_move(&self, vcpu: u64) -> Option<NodeId> {
        let to = self.slots.get(vcpu as usize)?.move_to.swap(NO_MOVE, Ordering::AcqRel);
        (to != NO_MOVE).then_some(to)
    }

    // ---- the page engine's view ------------------------------------------

    /// The vCPU a faulting thread runs, if it is one of ours.
    pub fn vcpu_of_thread(&self, tid: u32) -> Option<u32> {
        self.tids.lock().unwrap_or_else(|p| p.into_inner()).get(&(tid as i32)).copied()
    }

    /// A KVM vCPU's statistics the holds read (see `stats`).
    fn stats_of(fd: &VcpuFd) -> HoldStats {
        (VcpuStat::open(fd, "exits").map(Arc::new), VcpuStat::sum(fd, &DONE_STATS).map(Arc::new))
    }

    /// Where vCPU `vcpu` stands now, to tell later whether it ran since
    /// (the page engine's holds); None when no thread runs it here.
    pub fn run_mark(&self, vcpu: u32) -> Option<RunMark> {
        let slot = self.slots.get(vcpu as usize)?;
        let tid = u32::try_from(slot.tid.load(Ordering::Acquire)).ok().filter(|&t| t != 0)?;
        let (exits, done) = slot.stats.get().cloned().unwrap_or_default();
        RunMark::now(tid, exits, done)
    }

    /// A fault of vCPU `vcpu` (here) was served with bytes from `from`:
    /// the policy may decide to move the vCPU there. The fault is resolved
    /// either way (a vCPU blocked in the kernel on a page cannot be taken
    /// out without it: measured here, waking it unresolved only makes it
    /// fault again); the vCPU is kicked and leaves at its next exit.
    pub fn remote_fault(&self, vcpu: u32, from: NodeId, page: u64) {
        if !self.migration || from == self.me {
            return;
        }
        let decided = self.policy.lock().unwrap_or_else(|p| p.into_inner()).remote_fault(vcpu, from, page);
        let Some(to) = decided else { return };
        let slot = &self.slots[vcpu as usize];
        slot.move_to.store(to, Ordering::Release);
        if let Some(t) = slot.thread.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = t.kill(crate::vm::kick_signal());
        }
        tracing::debug!(vcpu, from = self.me, to, "policy: the vCPU follows its data");
    }

    // ---- migration -------------------------------------------------------

    /// Tells node `to` that `vcpu` comes, and the page under its stack,
    /// before the state is captured: the page travels meanwhile (its
    /// fetch took as long as the capture, the state's message and the
    /// restore together, and the vCPU waited for it on arrival).
    fn herald(&self, vcpu: &mut Vcpu, to: NodeId) -> Result<(), String> {
        match vcpu.stack_page() {
            Some(stack_page) => self.send_checked(to, &VcpuMsg::Coming { vcpu: vcpu.id() as u32, stack_page }),
            None => Ok(()),
        }
    }

    fn emigrate(&self, vcpu: Vcpu, to: NodeId) -> Result<(), String> {
        let id = vcpu.id() as u32;
        let slot = &self.slots[id as usize];
        let t0 = Instant::now();
        let (mut state, fd) = vcpu.leave(&self.msr_list, self.irqchip)?;
        self.counters.capture.lock().unwrap_or_else(|p| p.into_inner()).record(t0.elapsed());
        self.policy.lock().unwrap_or_else(|p| p.into_inner()).reset(id, None);
        // under the roster's lock: IPIs posted so far go with the state,
        // later ones see the new location and are forwarded behind it
        let mut r = self.roster();
        let acts = r.leave(id, to).map_err(|e| e.to_string())?;
        let Some(RAction::Send { msg: RMsg::Migrate { moves, pending, .. }, .. }) = acts.first().cloned() else {
            return Err(format!("the roster did not send vCPU {id} to node {to}: {acts:?}"));
        };
        state.pending_ipis = pending;
        let sent = self.send_checked(to, &VcpuMsg::Migrate { vcpu: id, moves, state: state.encode() });
        drop(r);
        // (this thread is the one that takes the vCPU back, if it comes)
        *slot.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Parked { fd, held: Box::new(state) });
        sent?;
        self.counters.migrations_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// vCPU `vcpu`'s state from node `from`: the roster learns it is here
    /// (before this receiver takes the next message: IPIs forwarded behind
    /// the state find it), and its thread here restores and runs it.
    fn immigrate(self: &Arc<Self>, from: NodeId, vcpu: u32, moves: u64, bytes: &[u8]) -> Result<(), String> {
        let slot = self
            .slots
            .get(vcpu as usize)
            .ok_or_else(|| format!("node {from} sent vCPU {vcpu}, which does not exist"))?;
        let state = VcpuState::decode(from, bytes).map_err(|e| e.to_string())?;
        if state.id != vcpu {
            return Err(format!("node {from} sent vCPU {}'s state as vCPU {vcpu}'s", state.id));
        }
        if self.roster().here(vcpu) {
            return Err(format!("node {from} sent vCPU {vcpu}, which already runs here"));
        }
        self.policy.lock().unwrap_or_else(|p| p.into_inner()).reset(vcpu, Some(from));
        {
            let mut r = self.roster();
            let msg = RMsg::Migrate { vcpu, moves, pending: state.pending_ipis };
            let acts = r.receive(from, msg).map_err(|e| e.to_string())?;
            // not `remote`: the IPIs posted here now came with the vCPU
            // (each was counted where it was posted first), not as IPIs
            self.carry_out(&r, acts, false);
        }
        self.counters.migrations_in.fetch_add(1, Ordering::Relaxed);
        // the thread that ran it here before waits for it; else start one
        let waiting = slot.thread.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if waiting {
            *slot.arrival.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(state));
            slot.door.notify_all();
            Ok(())
        } else {
            self.spawn(vcpu, First::Arrived(Box::new(state)))
        }
    }

    // ---- messages ----------------------------------------------------------

    /// A vCPU message from `from`. Node 0 also takes the console output
    /// and events of vCPUs elsewhere. Returns, for a vCPU about to arrive,
    /// the page it will most likely write first (for the page engine to
    /// ask for at once).
    pub fn on_message(self: &Arc<Self>, from: NodeId, body: &[u8]) -> Result<Option<u64>, String> {
        match VcpuMsg::decode(from, body)? {
            // (any page number: the engine ignores one outside the guest)
            VcpuMsg::Coming { vcpu, stack_page } if (vcpu as usize) < self.slots.len() => Ok(Some(stack_page)),
            VcpuMsg::Coming { vcpu, .. } => Err(format!("node {from} sends vCPU {vcpu}, which does not exist")),
            VcpuMsg::Migrate { vcpu, moves, state } => self.immigrate(from, vcpu, moves, &state).map(|()| None),
            VcpuMsg::Location { vcpu, node, moves } => {
                self.roster_receive(from, RMsg::Location { vcpu, node, moves }).map(|()| None)
            }
            VcpuMsg::Ipi { vcpu } => self.roster_receive(from, RMsg::Ipi { vcpu }).map(|()| None),
            VcpuMsg::Print { bytes } if self.me == 0 => {
                self.devices.console().lock().unwrap_or_else(|p| p.into_inner()).put(&bytes);
                Ok(None)
            }
            VcpuMsg::Event { event } if self.me == 0 => {
                if let VmEvent::Failed(why) = event {
                    self.control.fail(format_args!("node {from}: {why}"));
                } else {
                    self.control.report(event);
                }
                Ok(None)
            }
            other => Err(format!("node {from} sent node {} {other:?}, which only node 0 takes", self.me)),
        }
    }

    fn roster_receive(&self, from: NodeId, msg: RMsg) -> Result<(), String> {
        let mut r = self.roster();
        let acts = r.receive(from, msg).map_err(|e| e.to_string())?;
        self.carry_out(&r, acts, true);
        Ok(())
    }

    /// Sends node 0 what a vCPU here did (a member node's part).
    pub fn send_to_node0(&self, msg: VcpuMsg) {
        self.send(0, &msg);
    }

    fn send_checked(&self, to: NodeId, msg: &VcpuMsg) -> Result<(), String> {
        let t = self.transport.as_ref().ok_or("this VM has one node")?;
        t.send(to, &msg.encode()).map_err(|e| format!("sending to node {to}: {e}"))
    }

    /// Sends; a failure fails the VM (the node is gone, which the pod
    /// notices and names anyway).
    fn send(&self, to: NodeId, msg: &VcpuMsg) {
        if let Err(why) = self.send_checked(to, msg) {
            if !self.control.stopping() {
                self.control.fail(why);
            }
        }
    }

    // ---- the end -------------------------------------------------------------

    /// Stops every vCPU thread here: flag, kick until they are gone.
    /// `release` runs once when kicks alone have not stopped them within
    /// `release_after` (it unregisters guest memory from userfaultfd,
    /// which wakes a vCPU blocked on a fault that will not be resolved).
    pub fn stop(&self, release_after: Duration, release: &dyn Fn()) {
        self.control.stop();
        let start = Instant::now();
        let mut released = false;
        loop {
            let mut running = 0;
            for s in &self.slots {
                let t = s.thread.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = t.as_ref().filter(|t| !t.is_finished()) {
                    running += 1;
                    let _ = t.kill(crate::vm::kick_signal());
                }
                drop(t);
                s.bell.notify_all();
                s.door.notify_all();
            }
            if running == 0 {
                break;
            }
            let waited = start.elapsed();
            if !released && waited >= release_after {
                tracing::debug!("releasing guest memory from userfaultfd to stop the vCPUs");
                release();
                released = true;
            }
            if waited > Duration::from_secs(10) {
                tracing::error!("a vCPU thread does not stop; leaving it behind");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for s in &self.slots {
            if let Some(t) = s.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = t.join();
            }
        }
    }
}

/// The console of a node other than node 0: complete lines go to node 0's
/// console (one console for the VM, wherever a vCPU prints).
#[derive(Debug)]
pub struct ForwardConsole(pub Arc<dyn Transport>);

impl std::io::Write for ForwardConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for chunk in buf.chunks(8 << 10) {
            // best effort, as the console is: a node 0 that is gone is
            // noticed by the pod, not here
            let _ = self.0.send(0, &VcpuMsg::Print { bytes: chunk.to_vec() }.encode());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_messages_round_trip_and_bad_ones_are_errors() {
        let msgs = [
            VcpuMsg::Coming { vcpu: 1, stack_page: 7 },
            VcpuMsg::Migrate { vcpu: 1, moves: 2, state: vec![1, 2, 3] },
            VcpuMsg::Location { vcpu: 3, node: 2, moves: 9 },
            VcpuMsg::Ipi { vcpu: 4 },
            VcpuMsg::Print { bytes: b"hi\n".to_vec() },
            VcpuMsg::Event { event: VmEvent::Halted { vcpu: 2 } },
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(bytes[0], CHANNEL_VCPU);
            assert_eq!(VcpuMsg::decode(1, &bytes[1..]).unwrap(), m);
            for len in 1..bytes.len() {
                assert!(VcpuMsg::decode(1, &bytes[1..len]).is_err());
            }
        }
        assert!(VcpuMsg::decode(1, &[0, 0xfc, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
