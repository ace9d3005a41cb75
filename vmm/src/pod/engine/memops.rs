//! Carrying out the protocol's memory actions on this node's memory: the
//! ioctls and fabric reads behind zero-fill, fetch, map, write-protect,
//! unmap, drop, the zero check and the wake (the executor's I/O half; the
//! order they run in is `apply`'s, in `mod.rs`).

use shoal_fabric::ReadReq;
use shoal_protocol::{Access, Fetch, NodeId, Page};

use super::{fabric_error, Engine, FaultKind, State, ZeroRun, REGION_MEMORY};
use crate::memory::PAGE_SIZE;
use crate::pod::residency::Dropped;
use crate::uffd::{Outcome, Uffd};
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Engine {
    /// How a page that just arrived is mapped in the guest view: as
    /// `writable` says where there is a guest view.
    pub(super) fn arrival_mapping(&self, writable: bool) -> Option<bool> {
        self.uffd.is_some().then_some(writable)
    }

    pub(super) fn page_addr(&self, page: Page) -> u64 {
        self.mem.guest_view_base() + page * PAGE_SIZE
    }

    /// The pending zero-fills, taken as runs: one ioctl each, over
    /// contiguous pages of one block that are mapped alike. The pages stay
    /// marked pending (`Residency`) until [`Engine::zero_arrived`].
    pub(super) fn take_zero_runs(&self, st: &mut State) -> Vec<ZeroRun> {
        let mut runs = Vec::new();
        if st.pending_zero.is_empty() {
            return runs;
        }
        let mut pages = std::mem::take(&mut st.pending_zero);
        pages.sort_unstable();
        pages.dedup();
        let cfg = self.settings.config;
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n] == first + n as u64
                && cfg.block_of(first).contains(&(first + n as u64))
            {
                n += 1;
            }
            // a run is mapped writable when its pages are ours to write,
            // read-only when they are read copies of dormant pages
            let writable = st.node.local(first).writable;
            let n = (0..n).take_while(|&k| st.node.local(first + k as u64).writable == writable).count().max(1);
            runs.push(ZeroRun { first, count: n as u64, writable });
            i += n;
        }
        runs
    }

    /// Zero-fills the pending pages, one ioctl per run (with `--dormant
    /// off`, copies each run's contents in, read from its home when that
    /// is another node).
    pub(super) fn flush_zero(&self, st: &mut State) -> Result<(), String> {
        for run in self.take_zero_runs(st) {
            self.zero_run(st, run)?;
            self.zero_arrived(st, run);
        }
        Ok(())
    }

    /// A run's pages are here and mapped.
    pub(super) fn zero_arrived(&self, st: &mut State, run: ZeroRun) {
        if !run.writable {
            self.counters.pages_shared.fetch_add(run.count, Ordering::Relaxed);
        }
        for p in run.first..run.first + run.count {
            st.res.arrived(p, self.arrival_mapping(run.writable));
        }
    }

    /// Whether a run's fill needs nothing but the ioctl: zeros, of dormant
    /// pages or (`--dormant off`) of pages whose contents live here. Such
    /// a fill reads and writes no engine state, so it may run outside the
    /// engine's lock.
    pub(super) fn fills_alone(&self, run: &ZeroRun) -> bool {
        self.uffd.is_some() && (self.settings.dormant || self.settings.config.home(run.first) == self.me)
    }

    /// The fill of a run that [`Engine::fills_alone`]: zeros mapped as the
    /// run says, or (`--dormant off`) copied in; `wake`: the ioctl wakes
    /// the faults waiting in the run, once its pages are mapped.
    pub(super) fn fill_zeros(&self, run: &ZeroRun, wake: bool) -> Result<(), String> {
        let Some(uffd) = &self.uffd else { return Ok(()) };
        let ZeroRun { first, count, writable } = *run;
        let addr = self.page_addr(first);
        let len = count * PAGE_SIZE;
        if !self.settings.dormant {
            self.place(uffd, first, &self.zeros[..len as usize], writable, wake)?;
            self.counters.pages_copied.fetch_add(count, Ordering::Relaxed);
            return Ok(());
        }
        if !writable {
            // zeros through the alias view, then one mapping of them: a
            // read copy must never be mapped writable, not even for the
            // instant between a zero-fill and a write-protect
            self.mem.zero_alias(first * PAGE_SIZE, len);
            let ro = !writable;
            self.resolve(|d| uffd.continue_mode(addr + d, len - d, wake, ro), first, count, "map")?;
        } else {
            self.resolve(|d| uffd.zeropage(addr + d, len - d, wake), first, count, "zero-fill")?;
        }
        self.counters.pages_zero_filled.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn zero_run(&self, st: &mut State, run: ZeroRun) -> Result<(), String> {
        let ZeroRun { first, count, writable } = run;
        let Some(uffd) = &self.uffd else {
            // a node without a guest: a hole in its memfd is the zero page
            self.counters.pages_zero_filled.fetch_add(count, Ordering::Relaxed);
            return Ok(());
        };
        if self.fills_alone(&run) {
            return self.fill_zeros(&run, false);
        }
        // --dormant off: the page's contents live at its home, another node
        let home = self.settings.config.home(first);
        let len = count * PAGE_SIZE;
        let buf = &mut st.bounce[..len as usize];
        self.read_remote(home, first, buf)?;
        self.counters.remote_fetches.fetch_add(count, Ordering::Relaxed);
        self.counters.bytes_fabric_read.fetch_add(len, Ordering::Relaxed);
        let buf = &st.bounce[..len as usize];
        self.place(uffd, first, buf, writable, false)
    }

    /// Puts `bytes` into the guest at `first` and maps them: one
    /// `UFFDIO_COPY`; `wake`: and wakes the faults waiting there.
    pub(super) fn place(
        &self,
        uffd: &Uffd,
        first: Page,
        bytes: &[u8],
        writable: bool,
        wake: bool,
    ) -> Result<(), String> {
        let addr = self.page_addr(first);
        let count = bytes.len() as u64 / PAGE_SIZE;
        let ro = !writable;
        self.resolve(|d| uffd.copy_mode(addr + d, &bytes[d as usize..], wake, ro), first, count, "copy")
    }

    /// Runs a resolving ioctl over `count` pages from `first`; `op(done)`
    /// resolves what is left after `done` bytes. A page found present
    /// means our records are wrong (an error); a partial resolution goes
    /// on from where it stopped, EAGAIN is retried, both boundedly.
    pub(super) fn resolve(
        &self,
        mut op: impl FnMut(u64) -> crate::uffd::Result<Outcome>,
        first: Page,
        count: u64,
        what: &str,
    ) -> Result<(), String> {
        let mut done = 0;
        for _ in 0..1000 {
            match op(done).map_err(|e| format!("{what} of page {first}: {e}"))? {
                Outcome::Done => return Ok(()),
                Outcome::Retry => std::thread::yield_now(),
                Outcome::Partial { done: more } => done += more,
                Outcome::Exists => {
                    return Err(format!(
                        "{what}: page {} is present although this node did not hold it",
                        first + done / PAGE_SIZE
                    ))
                }
            }
            if done >= count * PAGE_SIZE {
                return Ok(());
            }
        }
        Err(format!("{what} of pages {first}+{count}: the kernel kept asking to retry"))
    }

    pub(super) fn read_remote(&self, from: NodeId, page: Page, buf: &mut [u8]) -> Result<(), String> {
        // (the first touch of a page under --dormant off: the home never
        // exposed it)
        let req = ReadReq { region: REGION_MEMORY, offset: page * PAGE_SIZE, len: buf.len(), key: 0 };
        // (over verbs a pod's transport refuses it, and the pod refuses
        // --dormant off over verbs before it starts: `pod::check_fabric`)
        let t = self.transport(from)?;
        t.read_with(from, &[req], &mut |_, at, bytes| {
            bytes.copy_to(&mut buf[at..at + bytes.len()]);
            Ok(())
        })
        .map_err(|e| fabric_error(t, format!("reading page {page} from node {from}"), e))
    }

    /// Pulls pages from `from` with one batch of one-sided reads (one
    /// ioctl-free request each, one round trip for the batch on tcp), then
    /// places each: `transfer`, it becomes ours (else a read copy, mapped
    /// read-only); `evict`, an eviction's bytes, parked here out of the guest
    /// view (the protocol parks them: our guest asks the home before it
    /// maps them).
    pub(super) fn fetch_many(&self, st: &mut State, from: NodeId, items: &[Fetch]) -> Result<(), String> {
        let page_len = PAGE_SIZE as usize;
        let mut buf = std::mem::take(&mut st.bounce);
        if buf.len() < items.len() * page_len {
            buf.resize(items.len() * page_len, 0);
        }
        let reqs: Vec<ReadReq> = items
            .iter()
            .map(|it| ReadReq { region: REGION_MEMORY, offset: it.page * PAGE_SIZE, len: page_len, key: it.key })
            .collect();
        let t0 = std::time::Instant::now();
        let got = self.transport(from).and_then(|t| {
            t.read_with(from, &reqs, &mut |i, at, bytes| {
                bytes.copy_to(&mut buf[i * page_len + at..i * page_len + at + bytes.len()]);
                Ok(())
            })
            .map_err(|e| fabric_error(t, format!("reading page {} from node {from}", items[0].page), e))
        });
        let t1 = std::time::Instant::now();
        #[cfg(debug_assertions)]
        if got.is_ok() {
            self.alter_for_tests(&mut buf[..items.len() * page_len]);
        }
        let mut placed = got.and_then(|()| self.check_digests(from, items, &buf));
        let mut maps = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            if placed.is_err() {
                break;
            }
            let bytes = &buf[i * page_len..(i + 1) * page_len];
            let m0 = std::time::Instant::now();
            placed = match &self.uffd {
                Some(uffd) if !it.evict => self.place(uffd, it.page, bytes, it.transfer, false),
                _ => {
                    self.mem.write_alias(it.page * PAGE_SIZE, bytes);
                    Ok(())
                }
            };
            maps.push(m0.elapsed());
        }
        st.bounce = buf;
        placed?;
        for (it, map) in items.iter().zip(maps) {
            let page = it.page;
            if let Some(w) = st.waiting.get_mut(&page) {
                // a page read with no answer awaited (parked at a peer: the
                // home reads it at once) waited for nobody until the read
                w.direct = w.answered.is_none();
                w.answered.get_or_insert(t0);
                w.read = t1 - t0;
                w.map = map;
            }
            self.counters.remote_fetches.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_fabric_read.fetch_add(PAGE_SIZE, Ordering::Relaxed);
            if !it.transfer {
                self.counters.pages_shared.fetch_add(1, Ordering::Relaxed);
            }
            // a page this node evicted and takes back is its own working
            // set coming home, not data of the node that kept it: the
            // policy does not follow it (it would only move the memory
            // pressure)
            let ours = st.res.is_placed(page);
            if ours {
                self.counters.pages_fetched_back.fetch_add(1, Ordering::Relaxed);
            }
            let mapping = if it.evict { None } else { self.arrival_mapping(it.transfer) };
            st.res.arrived(page, mapping);
            // (a parked page resolves no fault here: one that waits for it
            // waits for the home's answer)
            if let Some(w) = st.waiting.get_mut(&page).filter(|_| !it.evict) {
                w.kind = if w.access == Access::Write { FaultKind::RemoteWrite } else { FaultKind::RemoteRead };
                if let (Some(vcpu), Some(host), false) = (w.vcpu, self.vcpus.get(), ours) {
                    host.remote_fault(vcpu, from, page);
                }
            }
        }
        Ok(())
    }

    /// `--verify-pages`: the pages just pulled from `from` (in `buf`, one
    /// after the other) are what their owners offered; one that is not
    /// was altered or corrupted on the way, and ends the VM before any
    /// guest sees it.
    fn check_digests(&self, from: NodeId, items: &[Fetch], buf: &[u8]) -> Result<(), String> {
        let Some(digests) = &self.settings.digests else { return Ok(()) };
        let page_len = PAGE_SIZE as usize;
        for (i, it) in items.iter().enumerate() {
            if digests.of(it.page, &buf[i * page_len..(i + 1) * page_len]) != it.digest {
                return Err(format!(
                    "page {} read from node {from} is not what its owner offered (its digest differs): \
                     altered or corrupted on the way (--verify-pages)",
                    it.page
                ));
            }
        }
        Ok(())
    }

    /// Debug builds, for the tests of `--verify-pages`: with
    /// `SHOAL_TEST_ALTER_READ=NODE:N` in the environment, node NODE flips
    /// one bit of the Nth page it pulls (counting from 0), as a fabric
    /// that corrupted it, or someone on the path, would.
    #[cfg(debug_assertions)]
    fn alter_for_tests(&self, pulled: &mut [u8]) {
        static AT: std::sync::OnceLock<Option<(NodeId, u64)>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| {
            let v = std::env::var("SHOAL_TEST_ALTER_READ").ok()?;
            let (node, n) = v.split_once(':')?;
            Some((node.parse().ok()?, n.parse().ok()?))
        });
        let Some((node, at)) = *at else { return };
        let before = self.counters.remote_fetches.load(Ordering::Relaxed);
        let pages = pulled.len() as u64 / PAGE_SIZE;
        if node == self.me && (before..before + pages).contains(&at) {
            pulled[((at - before) * PAGE_SIZE) as usize + 100] ^= 1;
        }
    }

    /// Maps our copy in the guest view as the protocol allows: writable,
    /// or write-protected (a read copy, or ours while readers share it).
    pub(super) fn map(&self, st: &mut State, page: Page, writable: bool) -> Result<(), String> {
        if self.uffd.is_none() {
            return Ok(());
        }
        if st.res.mapping(page) == Some(writable) {
            return Ok(());
        }
        // a page the guest reported free stays out of its view until the
        // free is complete: a touch then faults and waits for it (mapped
        // now, the guest could write it and the free would lose that)
        if !st.reported.is_empty() && st.reported.contains(&page) {
            return Ok(());
        }
        self.remap(st, page, writable)
    }

    /// Maps our copy as `writable` says, whatever the guest view holds now
    /// (nothing, the page write-protected, or the page already as wanted).
    pub(super) fn remap(&self, st: &mut State, page: Page, writable: bool) -> Result<(), String> {
        let Some(uffd) = &self.uffd else { return Ok(()) };
        if !writable && !self.settings.read_copies {
            // this kernel cannot map it write-protected in one step: leave
            // it unmapped; the next touch faults and asks for write
            return Ok(());
        }
        let addr = self.page_addr(page);
        match uffd.continue_mode(addr, PAGE_SIZE, false, !writable) {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Exists) => {
                // mapped already: set its protection as asked
                uffd.write_protect(addr, PAGE_SIZE, !writable, false)
                    .map_err(|e| format!("protecting page {page}: {e}"))?;
            }
            Ok(other) => return Err(format!("mapping page {page}: {other:?}")),
            Err(e) => return Err(format!("mapping page {page}: {e}")),
        }
        st.res.set_mapping(page, Some(writable));
        Ok(())
    }

    /// Our copy stays readable by the guest here, but no longer writable.
    pub(super) fn write_protect(&self, st: &mut State, page: Page) -> Result<(), String> {
        let Some(uffd) = &self.uffd else { return Ok(()) };
        if st.res.mapping(page) != Some(true) {
            return Ok(());
        }
        uffd.write_protect(self.page_addr(page), PAGE_SIZE, true, false)
            .map_err(|e| format!("write-protecting page {page}: {e}"))?;
        st.res.set_mapping(page, Some(false));
        Ok(())
    }

    pub(super) fn unmap(&self, st: &mut State, page: Page) -> Result<(), String> {
        if self.uffd.is_none() || st.res.mapping(page).is_none() {
            return Ok(());
        }
        self.mem.unmap_guest_view(page * PAGE_SIZE, PAGE_SIZE).map_err(|e| format!("unmapping page {page}: {e}"))?;
        st.res.set_mapping(page, None);
        Ok(())
    }

    /// Lets peers' one-sided reads reach our copy of `page` until it is
    /// freed: the key they name (0 where the transport needs none, or
    /// without a pod). Over verbs a registration of that page alone.
    pub(super) fn expose(&self, page: Page) -> Result<u64, String> {
        match &self.transport {
            Some(t) => t
                .expose(REGION_MEMORY, page * PAGE_SIZE, PAGE_SIZE)
                .map_err(|e| format!("exposing page {page} to peers: {e}")),
            None => Ok(0),
        }
    }

    /// Frees pages `first..first + count`: their exposures end first (over
    /// verbs a registration pins its pages: punched while registered, the
    /// memory would stay taken, and peers would read it, not the page a
    /// refill puts there).
    fn release_pages(&self, first: Page, count: u64) -> Result<(), String> {
        if let Some(t) = &self.transport {
            t.unexpose(REGION_MEMORY, first * PAGE_SIZE, count * PAGE_SIZE);
        }
        self.mem
            .punch(first * PAGE_SIZE, count * PAGE_SIZE)
            .map_err(|e| format!("freeing pages {first}..{}: {e}", first + count))
    }

    /// Frees our copy of `page`, which went to `to` (None: to nobody).
    pub(super) fn drop_page(&self, st: &mut State, page: Page, to: Option<NodeId>) -> Result<(), String> {
        st.holds.remove(&page);
        self.release_pages(page, 1)?;
        match st.res.dropped(page, to) {
            Dropped::Evicted(_) => {
                self.counters.pages_evicted.fetch_add(1, Ordering::Relaxed);
            }
            Dropped::Redormanted => {
                self.counters.pages_redormanted.fetch_add(1, Ordering::Relaxed);
            }
            Dropped::Other => {}
        }
        Ok(())
    }

    /// Our copy of `page` goes because the guest freed the page: it is
    /// dormant again (not an eviction of ours, even if one was asked for:
    /// the home refuses that later). Recorded now; its memory is punched
    /// out by `flush_forgotten`, with its neighbours.
    pub(super) fn forget_page(&self, st: &mut State, page: Page) -> Result<(), String> {
        st.holds.remove(&page);
        st.res.forget_eviction(page);
        self.counters.pages_redormanted.fetch_add(1, Ordering::Relaxed);
        st.res.dropped(page, None);
        st.pending_forget.push(page);
        Ok(())
    }

    /// Punches out the pages `forget_page` recorded, a hole per run.
    pub(super) fn flush_forgotten(&self, st: &mut State) -> Result<(), String> {
        if st.pending_forget.is_empty() {
            return Ok(());
        }
        let mut pages = std::mem::take(&mut st.pending_forget);
        pages.sort_unstable();
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + (n as usize) < pages.len() && pages[i + n as usize] == first + n {
                n += 1;
            }
            self.release_pages(first, n)?;
            i += n as usize;
        }
        pages.clear();
        st.pending_forget = pages;
        Ok(())
    }

    /// What a peer is offered of our protected copy of `page`: whether it
    /// is all zeros (with dormant pages, then nothing travels) and, with
    /// `--verify-pages`, the digest of its bytes (else 0).
    pub(super) fn offered(&self, st: &State, page: Page) -> (bool, u64) {
        let Some(digests) = &self.settings.digests else {
            return (self.settings.dormant && self.is_zero(st, page), 0);
        };
        let bytes = self.protected_bytes(st, page);
        let zero = self.settings.dormant && bytes.iter().all(|&b| b == 0);
        (zero, digests.of(page, &bytes))
    }

    /// The bytes of our protected copy of `page` as a peer would read
    /// them: a hole, or a page not resident here, is zeros (the guest
    /// cannot write the page, and reading the alias view of a resident
    /// page materialises nothing).
    fn protected_bytes(&self, st: &State, page: Page) -> [u8; PAGE_SIZE as usize] {
        let offset = page * PAGE_SIZE;
        let mut bytes = [0u8; PAGE_SIZE as usize];
        if st.res.is_resident(page) && !self.mem.is_hole(offset).unwrap_or(false) {
            self.mem.read_alias(offset, &mut bytes);
        }
        bytes
    }

    /// Whether our (protected) copy of `page` is all zeros.
    pub(super) fn is_zero(&self, st: &State, page: Page) -> bool {
        self.protected_bytes(st, page).iter().all(|&b| b == 0)
    }

    pub(super) fn wake_now(&self, page: Page) -> Result<(), String> {
        match &self.uffd {
            Some(uffd) => uffd.wake(self.page_addr(page), PAGE_SIZE).map_err(|e| format!("waking page {page}: {e}")),
            None => Ok(()),
        }
    }

    /// Wakes the faults the event resolved, each page mapped as the
    /// protocol allows first, and records their time. Pages a fill outside
    /// the lock woke already (`State::woken_by_fill`) are not woken again;
    /// their time ends when that fill did.
    pub(super) fn flush_wakes(&self, st: &mut State) -> Result<(), String> {
        let mut wakes = std::mem::take(&mut st.wakes);
        let woken = std::mem::take(&mut st.woken_by_fill);
        let filled_at = st.filled_at.take();
        if self.uffd.is_none() {
            return Ok(());
        }
        let woken_already = |page: Page| woken.iter().any(|r| (r.first..r.first + r.count).contains(&page));
        wakes.sort_unstable();
        wakes.dedup();
        for &page in &wakes {
            let l = st.node.local(page);
            if st.res.is_resident(page) && l.allows(Access::Read) {
                // ours, but maybe not (or not as writable) in the guest
                // view: map it, or the vCPU would fault again forever
                self.map(st, page, l.writable)?;
            }
            let mut slow = false;
            if st.res.woken(page) {
                let w = st.waiting.remove(&page);
                // a page a vCPU's fault brought from another node stays
                // until the vCPU has run (rule 10)
                if let Some(vcpu) = w.filter(|w| w.kind != FaultKind::Zero && !w.prefetch).and_then(|w| w.vcpu) {
                    slow = self.hold(st, page, vcpu) && cfg!(debug_assertions) && self.slow_wake_for_tests().is_some();
                }
                // a prefetch is no fault: its time is not a fault's
                if let Some(w) = w.filter(|w| !w.prefetch) {
                    let took = match filled_at {
                        Some(at) if woken_already(page) => at.saturating_duration_since(w.since),
                        _ => w.since.elapsed(),
                    };
                    st.latency.record(took);
                    match w.kind {
                        FaultKind::Zero => st.latency_zero.record(took),
                        FaultKind::RemoteRead | FaultKind::RemoteWrite => {
                            st.latency_remote.record(took);
                            if w.kind == FaultKind::RemoteRead {
                                st.latency_remote_read.record(took);
                            } else {
                                st.latency_remote_write.record(took);
                            }
                            if w.direct {
                                st.latency_remote_direct.record(took);
                            } else {
                                st.latency_remote_asked.record(took);
                            }
                            let owner = w.answered.map_or(took, |a| a - w.since);
                            let b = &mut st.breakdown;
                            b.owner.record(owner);
                            b.read.record(w.read);
                            b.map.record(w.map);
                            b.rest.record(took.saturating_sub(owner + w.read + w.map));
                        }
                        FaultKind::Upgrade => st.latency_upgrade.record(took),
                    }
                }
            }
            if slow {
                self.wake_later_for_tests(page);
            } else if !woken_already(page) {
                self.wake_now(page)?;
            }
        }
        Ok(())
    }

    /// Holds `page` for `vcpu`, about to be woken (rule 10): marks where
    /// the vCPU stands (a mark per vCPU: this wake renews its other
    /// holds), and lets the holds older than [`super::HOLD_MAX`] go.
    /// Returns whether it holds the page (not when no thread runs the
    /// vCPU here).
    fn hold(&self, st: &mut State, page: Page, vcpu: u32) -> bool {
        let now = Instant::now();
        while let Some(&(at, p)) = st.hold_order.front().filter(|(at, _)| now - *at >= super::HOLD_MAX) {
            st.hold_order.pop_front();
            if st.holds.get(&p).is_some_and(|h| h.since == at) {
                st.holds.remove(&p);
            }
        }
        let Some(mark) = self.vcpus.get().and_then(|host| host.run_mark(vcpu)) else {
            return false;
        };
        self.counters.pages_held.fetch_add(1, Ordering::Relaxed);
        st.marks.insert(vcpu, mark);
        st.holds.insert(page, super::Hold { vcpu, since: now });
        st.hold_order.push_back((now, page));
        true
    }

    /// Debug builds, for the tests of holds (rule 10): with
    /// `SHOAL_TEST_SLOW_WAKE=NODE:MICROSECONDS` in the environment, on node
    /// NODE a vCPU whose fault brought a page from another node is woken
    /// that much later (the page mapped meanwhile), as a host slow to run
    /// a woken vCPU again would be.
    fn slow_wake_for_tests(&self) -> Option<std::time::Duration> {
        static SLOW: std::sync::OnceLock<Option<(NodeId, u64)>> = std::sync::OnceLock::new();
        let (node, us) = (*SLOW.get_or_init(|| {
            let v = std::env::var("SHOAL_TEST_SLOW_WAKE").ok()?;
            let (node, us) = v.split_once(':')?;
            Some((node.parse().ok()?, us.parse().ok()?))
        }))?;
        (node == self.me).then_some(std::time::Duration::from_micros(us))
    }

    fn wake_later_for_tests(&self, page: Page) {
        let (Some(uffd), Some(after)) = (self.uffd.clone(), self.slow_wake_for_tests()) else { return };
        let addr = self.page_addr(page);
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = uffd.wake(addr, PAGE_SIZE);
        });
    }
}
