//! A small safe wrapper over the raw verbs API of `rdma-sys`: devices,
//! protection domains, completion queues and channels, memory regions and
//! RC queue pairs, each freed when dropped (children hold their parents).
//!
//! `rdma-sys` rather than `ibverbs` (0.9): the latter cannot post one-sided
//! READs in its safe API nor register existing memory (checked against 0.9's API).
//! libibverbs objects are thread-safe, so the wrappers are Send + Sync;
//! what must not run concurrently (posting on one queue pair and polling
//! its completions) is serialised by the caller.

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

use crate::wire::VerbsEndpoint;
use crate::{Error, Result};

/// `IBV_LINK_LAYER_INFINIBAND` / `_ETHERNET` (an anonymous enum in
/// verbs.h, which the bindings leave out).
pub const LINK_LAYER_INFINIBAND: u8 = 1;
pub const LINK_LAYER_ETHERNET: u8 = 2;

fn verr(what: &str) -> Error {
    Error::Verbs(format!("{what}: {}", io::Error::last_os_error()))
}

fn verr_code(what: &str, code: i32) -> Error {
    Error::Verbs(format!("{what}: {}", io::Error::from_raw_os_error(code)))
}

/// Names of the RDMA devices on this machine.
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a
    // NULL-terminated array we free below, or NULL.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the array has `n` valid device pointers; each name is a
        // NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// An open RDMA device.
#[derive(Debug)]
pub struct Context {
    ptr: NonNull<ibv_context>,
    pub name: String,
}

// SAFETY: libibverbs contexts may be used from any thread.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// What we need of a port.
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    pub lid: u16,
    pub active_mtu: u32,
    pub link_layer: u8,
    pub gid_tbl_len: i32,
    pub state: u32,
}

impl Context {
    /// Opens device `name`, or the first one.
    pub fn open(name: Option<&str>) -> Result<Arc<Context>> {
        let mut n = 0;
        // SAFETY: as in device_names.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || n <= 0 {
            if !list.is_null() {
                // SAFETY: freed once.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(Error::NoDevice(
                " found (no InfiniBand/RoCE adapter, and no soft-RoCE: `rdma link add rxe0 type rxe netdev IFACE`)"
                    .into(),
            ));
        }
        let mut chosen = None;
        let mut names = Vec::new();
        for i in 0..n as usize {
            // SAFETY: `n` valid entries.
            let dev = unsafe { *list.add(i) };
            // SAFETY: a NUL-terminated name owned by the list.
            let dname = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }.to_string_lossy().into_owned();
            if chosen.is_none() && name.is_none_or(|want| want == dname) {
                chosen = Some((dev, dname.clone()));
            }
            names.push(dname);
        }
        let result = match chosen {
            None => Err(Error::NoDevice(format!(
                " named {:?} (devices here: {})",
                name.unwrap_or_default(),
                names.join(", ")
            ))),
            Some((dev, dname)) => {
                // SAFETY: `dev` is a device of the live list.
                let ctx = unsafe { ibv_open_device(dev) };
                NonNull::new(ctx)
                    .map(|ptr| Arc::new(Context { ptr, name: dname.clone() }))
                    .ok_or_else(|| verr(&format!("opening RDMA device {dname}")))
            }
        };
        // SAFETY: an opened context stays valid after the list is freed.
        unsafe { ibv_free_device_list(list) };
        result
    }

    pub fn as_ptr(&self) -> *mut ibv_context {
        self.ptr.as_ptr()
    }

    pub fn query_port(&self, port: u8) -> Result<PortInfo> {
        // SAFETY: plain data filled in by the call.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a writable attr struct of the size the
        // helper passes along.
        let ret = unsafe { ___ibv_query_port(self.as_ptr(), port, &mut attr) };
        if ret != 0 {
            return Err(verr_code(&format!("querying port {port} of {}", self.name), ret));
        }
        Ok(PortInfo {
            lid: attr.lid,
            active_mtu: attr.active_mtu,
            link_layer: attr.link_layer,
            gid_tbl_len: attr.gid_tbl_len,
            state: attr.state,
        })
    }

    pub fn query_gid(&self, port: u8, index: i32) -> Result<[u8; 16]> {
        // SAFETY: plain data.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a writable gid.
        let ret = unsafe { ibv_query_gid(self.as_ptr(), port, index, &mut gid) };
        if ret != 0 {
            return Err(verr_code(&format!("querying GID {index} of {} port {port}", self.name), ret));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok(unsafe { gid.raw })
    }

    /// The GID's type as sysfs names it ("RoCE v2", "IB/RoCE v1").
    pub fn gid_type(&self, port: u8, index: i32) -> Option<String> {
        std::fs::read_to_string(format!("/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}", self.name))
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child (PD, CQ, ...) holds an Arc of us, so none is
        // left; the context is closed once.
        unsafe { ibv_close_device(self.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    ptr: NonNull<ibv_pd>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>> {
        // SAFETY: a live context.
        let pd = unsafe { ibv_alloc_pd(ctx.as_ptr()) };
        NonNull::new(pd).map(|ptr| Arc::new(Pd { ptr, _ctx: ctx.clone() })).ok_or_else(|| verr("allocating a PD"))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc of us, so none is left.
        unsafe { ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

/// A completion channel: a file descriptor that becomes readable when a
/// CQ armed with `req_notify` gets a completion.
#[derive(Debug)]
pub struct CompChannel {
    ptr: NonNull<ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe.
unsafe impl Send for CompChannel {}
// SAFETY: as above.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<CompChannel>> {
        // SAFETY: a live context.
        let ch = unsafe { ibv_create_comp_channel(ctx.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| verr("creating a completion channel"))?;
        // SAFETY: `fd` is the channel's open descriptor; we only add
        // O_NONBLOCK so that reading events never blocks.
        unsafe {
            let fd = (*ch.as_ptr()).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Arc::new(CompChannel { ptr: ch, _ctx: ctx.clone() }))
    }

    pub fn fd(&self) -> i32 {
        // SAFETY: the channel is live.
        unsafe { (*self.ptr.as_ptr()).fd }
    }

    /// Takes one pending event (for `cq`) and acknowledges it; false when
    /// none was pending.
    pub fn take_event(&self) -> bool {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: a live, non-blocking channel; out-pointers are ours.
        let ret = unsafe { ibv_get_cq_event(self.ptr.as_ptr(), &mut cq, &mut ctx) };
        if ret != 0 {
            return false;
        }
        // SAFETY: `cq` is the CQ the event was for; one event to ack.
        unsafe { ibv_ack_cq_events(cq, 1) };
        true
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: CQs using the channel hold an Arc of it, so none is left.
        unsafe { ibv_destroy_comp_channel(self.ptr.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    ptr: NonNull<ibv_cq>,
    _channel: Option<Arc<CompChannel>>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

/// One completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub byte_len: u32,
    pub qp_num: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }

    pub fn status_text(&self) -> String {
        // SAFETY: returns a static string for any status value.
        unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) }.to_string_lossy().into_owned()
    }
}

/// Room for polled completions, reused across polls.
pub struct PollBuf {
    wcs: Vec<ibv_wc>,
}

impl std::fmt::Debug for PollBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PollBuf({})", self.wcs.len())
    }
}

impl PollBuf {
    pub fn new(n: usize) -> Self {
        // SAFETY: ibv_wc is plain data; zero is a valid (empty) value.
        PollBuf { wcs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect() }
    }

    /// Completion `i` of the last poll.
    pub fn get(&self, i: usize) -> Completion {
        let wc = &self.wcs[i];
        Completion { wr_id: wc.wr_id, status: wc.status, byte_len: wc.byte_len, qp_num: wc.qp_num }
    }
}

// SAFETY: plain data owned by one thread at a time.
unsafe impl Send for PollBuf {}

impl Cq {
    pub fn new(ctx: &Arc<Context>, depth: i32, channel: Option<&Arc<CompChannel>>) -> Result<Arc<Cq>> {
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.ptr.as_ptr());
        // SAFETY: a live context and (optional) channel.
        let cq = unsafe { ibv_create_cq(ctx.as_ptr(), depth, std::ptr::null_mut(), ch, 0) };
        NonNull::new(cq)
            .map(|ptr| Arc::new(Cq { ptr, _channel: channel.cloned(), _ctx: ctx.clone() }))
            .ok_or_else(|| verr("creating a completion queue"))
    }

    /// Polls completions into `buf` (as many as it holds); returns how
    /// many arrived. No allocation: this runs in the busy-poll loop.
    pub fn poll(&self, buf: &mut PollBuf) -> Result<usize> {
        // SAFETY: a live CQ and a writable array of `buf.wcs.len()` entries.
        let n = unsafe { ibv_poll_cq(self.ptr.as_ptr(), buf.wcs.len() as i32, buf.wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(Error::Verbs("polling a completion queue failed".into()));
        }
        Ok(n as usize)
    }

    /// Arms the CQ: its next completion raises an event on its channel.
    pub fn req_notify(&self) -> Result<()> {
        // SAFETY: a live CQ.
        let ret = unsafe { ibv_req_notify_cq(self.ptr.as_ptr(), 0) };
        if ret != 0 {
            return Err(verr_code("arming a completion queue", ret));
        }
        Ok(())
    }

    fn as_ptr(&self) -> *mut ibv_cq {
        self.ptr.as_ptr()
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs using the CQ hold an Arc of it, so none is left.
        unsafe { ibv_destroy_cq(self.ptr.as_ptr()) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    ptr: NonNull<ibv_mr>,
    _pd: Arc<Pd>,
}

// SAFETY: verbs objects are thread-safe.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// Access for memory peers read (never write).
pub const ACCESS_REMOTE_READ: u32 = ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
/// Access for memory the device writes locally (read destinations,
/// receive buffers).
pub const ACCESS_LOCAL_WRITE: u32 = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;

impl Mr {
    /// Registers `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay mapped until the Mr is dropped, and with
    /// ACCESS_LOCAL_WRITE the device may write it at any time an operation
    /// targeting it is outstanding.
    pub unsafe fn register(pd: &Arc<Pd>, addr: *mut u8, len: usize, access: u32) -> Result<Mr> {
        // SAFETY: per the caller; the PD is live.
        let mr = unsafe { ibv_reg_mr(pd.ptr.as_ptr(), addr.cast(), len, access as i32) };
        NonNull::new(mr).map(|ptr| Mr { ptr, _pd: pd.clone() }).ok_or_else(|| {
            verr(&format!(
                "registering {len} bytes of memory (the locked-memory limit, ulimit -l, or the device's limit on \
                 registrations, max_mr)"
            ))
        })
    }

    /// Registers `[addr, addr + len)` so that peers name it as
    /// `[iova, iova + len)` (not by our virtual address).
    ///
    /// # Safety
    /// As [`Mr::register`].
    pub unsafe fn register_at(pd: &Arc<Pd>, addr: *mut u8, len: usize, iova: u64, access: u32) -> Result<Mr> {
        // SAFETY: per the caller; the PD is live.
        let mr = unsafe { ibv_reg_mr_iova(pd.ptr.as_ptr(), addr.cast(), len, iova, access as i32) };
        NonNull::new(mr).map(|ptr| Mr { ptr, _pd: pd.clone() }).ok_or_else(|| {
            verr(&format!(
                "registering {len} bytes of memory (the locked-memory limit, ulimit -l, or the device's limit on \
                 registrations, max_mr)"
            ))
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: deregistered once; nothing posted against it remains
        // (owners drop QPs first).
        unsafe { ibv_dereg_mr(self.ptr.as_ptr()) };
    }
}

/// An RC queue pair.
#[derive(Debug)]
pub struct Qp {
    ptr: NonNull<ibv_qp>,
    _pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
}

// SAFETY: verbs objects are thread-safe; posting is serialised by callers.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

/// Where the remote end of a queue pair is, and how to reach it.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    pub port: u8,
    pub sgid_index: u8,
    /// RoCE (and IB across subnets) needs the global route header.
    pub global: bool,
    pub mtu: u32,
}

impl Qp {
    pub fn new_rc(pd: &Arc<Pd>, send_cq: &Arc<Cq>, recv_cq: &Arc<Cq>, max_send: u32, max_recv: u32) -> Result<Qp> {
        // SAFETY: plain data.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.as_ptr();
        init.recv_cq = recv_cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = max_send;
        init.cap.max_recv_wr = max_recv;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: a live PD and CQs; `init` is fully initialised.
        let qp = unsafe { ibv_create_qp(pd.ptr.as_ptr(), &mut init) };
        NonNull::new(qp)
            .map(|ptr| Qp { ptr, _pd: pd.clone(), _send_cq: send_cq.clone(), _recv_cq: recv_cq.clone() })
            .ok_or_else(|| verr("creating an RC queue pair"))
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { (*self.ptr.as_ptr()).qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: u32, what: &str) -> Result<()> {
        // SAFETY: a live QP and a filled attr; the mask says which fields.
        let ret = unsafe { ibv_modify_qp(self.ptr.as_ptr(), attr, mask as i32) };
        if ret != 0 {
            return Err(verr_code(&format!("moving the queue pair to {what}"), ret));
        }
        Ok(())
    }

    /// RESET → INIT → RTR → RTS, connected to `remote`. Peers may only read
    /// our memory (REMOTE_READ), never write it.
    pub fn connect(&self, path: &Path, my_psn: u32, remote: &VerbsEndpoint) -> Result<()> {
        use ibv_qp_attr_mask as m;
        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = path.port;
        a.qp_access_flags = ACCESS_REMOTE_READ;
        self.modify(
            &mut a,
            (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
            "INIT",
        )?;

        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path.mtu.min(u32::from(remote.mtu));
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 16;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = path.port;
        if path.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = path.sgid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut a,
            (m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER)
                .0,
            "RTR",
        )?;

        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14; // 4.096 us * 2^14 = 67 ms per try
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.sq_psn = my_psn;
        a.max_rd_atomic = 16;
        self.modify(
            &mut a,
            (m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC)
                .0,
            "RTS",
        )
    }

    /// Moves the queue pair to ERROR: every outstanding work request is
    /// flushed, so no late completion can write memory we reuse.
    pub fn set_error(&self) {
        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE.0, "ERROR");
    }

    /// Posts RDMA READs, all signaled, as one list built in `scratch`.
    ///
    /// # Safety
    /// Every local range must lie in a region registered with LOCAL_WRITE
    /// under `lkey` and stay untouched until its completion is polled (or
    /// the QP is moved to ERROR).
    pub unsafe fn post_reads(&self, reads: &[ReadWr], scratch: &mut PostBuf) -> Result<()> {
        if reads.is_empty() {
            return Ok(());
        }
        scratch.sges.clear();
        scratch.wrs.clear();
        for r in reads {
            scratch.sges.push(ibv_sge { addr: r.local, length: r.len, lkey: r.lkey });
            // SAFETY: plain data, filled below.
            let mut w: ibv_send_wr = unsafe { std::mem::zeroed() };
            w.wr_id = r.wr_id;
            w.num_sge = 1;
            w.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            w.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            w.wr.rdma = rdma_t { remote_addr: r.remote, rkey: r.rkey };
            scratch.wrs.push(w);
        }
        // link the list now that neither vector moves any more
        let n = reads.len();
        for i in 0..n {
            let next = if i + 1 < n { &mut scratch.wrs[i + 1] as *mut ibv_send_wr } else { std::ptr::null_mut() };
            scratch.wrs[i].next = next;
            scratch.wrs[i].sg_list = &mut scratch.sges[i];
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: a live QP; the list and its SGEs live across the call
        // (the provider copies them); memory validity is the caller's.
        let ret = unsafe { ibv_post_send(self.ptr.as_ptr(), scratch.wrs.as_mut_ptr(), &mut bad) };
        if ret != 0 {
            return Err(verr_code("posting RDMA reads", ret));
        }
        Ok(())
    }

    /// Posts one signaled SEND of `[addr, addr + len)`.
    ///
    /// # Safety
    /// The range must be registered under `lkey` and unchanged until the
    /// completion is polled.
    pub unsafe fn post_send(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> Result<()> {
        let mut sge = ibv_sge { addr, length: len, lkey };
        // SAFETY: plain data.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: as in post_reads.
        let ret = unsafe { ibv_post_send(self.ptr.as_ptr(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(verr_code("posting a send", ret));
        }
        Ok(())
    }

    /// Posts one receive buffer.
    ///
    /// # Safety
    /// The range must be registered with LOCAL_WRITE under `lkey`, and not
    /// read or reused until its completion is polled.
    pub unsafe fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> Result<()> {
        let mut sge = ibv_sge { addr, length: len, lkey };
        let mut wr = ibv_recv_wr { wr_id, next: std::ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: a live QP; `wr` and `sge` live across the call.
        let ret = unsafe { ibv_post_recv(self.ptr.as_ptr(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(verr_code("posting a receive", ret));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: destroyed once; its CQs and PD outlive it (we hold them).
        unsafe { ibv_destroy_qp(self.ptr.as_ptr()) };
    }
}

/// One RDMA READ: `len` bytes from `remote` (under `rkey`) to `local`
/// (under `lkey`).
#[derive(Clone, Copy, Debug)]
pub struct ReadWr {
    pub wr_id: u64,
    pub local: u64,
    pub len: u32,
    pub lkey: u32,
    pub remote: u64,
    pub rkey: u32,
}

/// Work requests being built, reused across posts.
#[derive(Default)]
pub struct PostBuf {
    sges: Vec<ibv_sge>,
    wrs: Vec<ibv_send_wr>,
}

impl std::fmt::Debug for PostBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostBuf({})", self.wrs.capacity())
    }
}

// SAFETY: plain data (the raw pointers inside point into the buffer
// itself and are rebuilt on every post), owned by one thread at a time.
unsafe impl Send for PostBuf {}

/// Page-aligned memory owned by us, for registration as bounce and
/// receive buffers.
#[derive(Debug)]
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; accesses are coordinated by its owner.
unsafe impl Send for Buffer {}
// SAFETY: as above.
unsafe impl Sync for Buffer {}

impl Buffer {
    pub fn new(len: usize) -> Result<Buffer> {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io {
                what: format!("allocating a {len}-byte buffer"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Buffer { ptr: NonNull::new(p.cast()).expect("mmap never returns NULL on success"), len })
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once (MRs over it are dropped
        // first by their owners).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
