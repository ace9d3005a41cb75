//! The pager: resolves the guest's faults on memory this node does not
//! hold yet.
//!
//! Every page starts dormant except what the loader wrote (read back from
//! the memfd itself, so the two can never disagree). A fault on a dormant
//! page is resolved by zero-filling the whole dormant run around it inside
//! its 2 MiB block with one `UFFDIO_ZEROPAGE` (fault-around): one round
//! trip through userfaultfd serves up to 512 first touches. With
//! `--dormant off` every page counts as having contents, and the same path
//! copies them in (`UFFDIO_COPY`) instead: on one node the contents of a
//! never-written page are zeros, so the guest sees the same bytes, and the
//! difference in cost is what dormant pages save.
//!
//! `state` holds the I/O-free logic; `handler` the threads that read
//! userfaultfd.

pub mod handler;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::metrics::PagerCounters;
use crate::uffd::{self, Fault, Outcome, Uffd};
use state::{plan_run, PageStates, BLOCK_PAGES};

/// Lock stripes: a fault takes the lock of its block, so faults on
/// different blocks resolve in parallel and two on one block never race.
const STRIPES: usize = 64;

/// Errors that end the VM: the fault they belong to cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "node memory budget exhausted: {budget} pages ({mib} MiB) are resident and the guest touched \
         guest-physical {gpa:#x}; raise --node-memory (a single node has nowhere to evict to)",
        mib = (budget * PAGE_SIZE) >> 20
    )]
    BudgetExhausted { budget: u64, gpa: u64 },
    #[error("fault at host address {addr:#x} is outside guest memory")]
    OutsideGuest { addr: u64 },
    #[error("resolving the fault at guest-physical {gpa:#x}: {source}")]
    Resolve {
        gpa: u64,
        #[source]
        source: uffd::Error,
    },
    #[error("the fault at guest-physical {gpa:#x} stayed unresolved after {BLOCK_PAGES} attempts")]
    Unresolved { gpa: u64 },
    #[error("waiting for page faults failed: {0}")]
    Poll(#[source] std::io::Error),
    #[error("{0}")]
    Read(#[source] uffd::Error),
    #[error("guest memory at {gpa:#x} (+{len:#x}) is outside RAM")]
    GuestRange { gpa: u64, len: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How pages with no data come to exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Dormant pages are zero-filled locally (the fast path); when false
    /// every page is treated as having contents and copied in.
    pub dormant: bool,
    /// Most pages this node may hold (`--node-memory`); None: no limit.
    pub budget_pages: Option<u64>,
}

/// What one fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The page was resident already (another fault in its run won).
    AlreadyResident,
    /// `pages` dormant pages were zero-filled.
    ZeroFilled { pages: u64 },
    /// `pages` pages had their contents copied in.
    Copied { pages: u64 },
}

/// The pager of one node.
#[derive(Debug)]
pub struct Pager {
    mem: Arc<GuestMemory>,
    uffd: Arc<Uffd>,
    policy: Policy,
    states: PageStates,
    stripes: Vec<Mutex<()>>,
    resident: AtomicU64,
    counters: PagerCounters,
    /// Where `--dormant off` copies a never-written page's contents from.
    contents: Box<[u8]>,
}

impl Pager {
    /// A pager over `mem`, whose guest view `uffd` watches. Pages already in
    /// the memfd (the loader's) start resident, every other page dormant.
    pub fn new(mem: Arc<GuestMemory>, uffd: Arc<Uffd>, policy: Policy) -> std::io::Result<Self> {
        let states = PageStates::new(mem.layout().pages());
        let mut loaded = 0;
        for (offset, len) in mem.populated_extents()? {
            loaded += states.set_resident(offset / PAGE_SIZE, len.div_ceil(PAGE_SIZE));
        }
        let counters = PagerCounters::default();
        counters.pages_loaded.store(loaded, Ordering::Relaxed);
        let contents = if policy.dormant {
            Box::default()
        } else {
            vec![0u8; (BLOCK_PAGES * PAGE_SIZE) as usize].into_boxed_slice()
        };
        Ok(Pager {
            mem,
            uffd,
            policy,
            states,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            resident: AtomicU64::new(loaded),
            counters,
            contents,
        })
    }

    /// The counters.
    pub fn counters(&self) -> &PagerCounters {
        &self.counters
    }

    /// Pages resident on this node.
    pub fn resident_pages(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Resolves one fault and wakes the thread that took it.
    pub fn handle_fault(&self, fault: Fault) -> Result<Resolution> {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let base = self.mem.guest_view_base();
        let layout = self.mem.layout();
        let offset = fault
            .addr
            .checked_sub(base)
            .filter(|o| *o < layout.size())
            .ok_or(Error::OutsideGuest { addr: fault.addr })?;
        let page = offset / PAGE_SIZE;
        // the 2 MiB block in guest-physical terms: regions start 2 MiB
        // aligned both in GPA and in the memfd, so clamping the memfd block
        // to the region is the same block
        let region = *layout.region_of_offset(offset).ok_or(Error::OutsideGuest { addr: fault.addr })?;
        let lo = (page & !(BLOCK_PAGES - 1)).max(region.offset / PAGE_SIZE);
        let hi = ((page | (BLOCK_PAGES - 1)) + 1).min((region.offset + region.len) / PAGE_SIZE);
        let gpa = region.gpa + (offset - region.offset);

        let _guard = self.stripes[(page / BLOCK_PAGES) as usize % STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut resolved = 0;
        let mut fault_mapped = false;
        // A resolving ioctl stops early when it meets a page that is
        // present after all (EEXIST) or must be retried (EAGAIN); each turn
        // makes progress, so a block's worth of turns is the bound.
        for _ in 0..=BLOCK_PAGES {
            if self.states.is_resident(page) {
                break;
            }
            // the whole dormant run, then as much of it as the budget
            // grants (reserved before the ioctl, so that faults resolving
            // in parallel on other blocks cannot overshoot it together)
            let full = plan_run(page, lo, hi, |p| self.states.is_resident(p));
            let run = full
                .trim(page, self.reserve(full.count))
                .ok_or(Error::BudgetExhausted { budget: self.policy.budget_pages.unwrap_or(0), gpa })?;
            let addr = base + run.first * PAGE_SIZE;
            let len = run.count * PAGE_SIZE;
            // DONTWAKE: the pages must be marked resident before the vCPU
            // runs on, or a hypercall reading them (read_guest) could see
            // them as dormant and return zeros for what the guest just wrote
            let result = if self.policy.dormant {
                self.uffd.zeropage(addr, len, false)
            } else {
                self.uffd.copy(addr, &self.contents[..len as usize], false)
            };
            let mapped = match result {
                Ok(Outcome::Done) => run.count,
                Ok(Outcome::Partial { done }) => done / PAGE_SIZE,
                Ok(Outcome::Exists | Outcome::Retry) => 0,
                Err(source) => {
                    self.resident.fetch_sub(run.count, Ordering::Relaxed);
                    return Err(Error::Resolve { gpa, source });
                }
            };
            // give back what was reserved and not mapped
            self.resident.fetch_sub(run.count - mapped, Ordering::Relaxed);
            self.account(run.first, mapped);
            resolved += mapped;
            if mapped > 0 {
                self.uffd.wake(addr, mapped * PAGE_SIZE).map_err(|source| Error::Resolve { gpa, source })?;
            }
            fault_mapped |= page >= run.first && page < run.first + mapped;
            if matches!(result, Ok(Outcome::Retry)) {
                // the address space is changing under us: let it settle
                std::thread::yield_now();
            }
            // the kernel has the run's first page although we believed it
            // dormant: it is resident, whatever we thought
            if matches!(result, Ok(Outcome::Exists)) && self.states.set_resident(run.first, 1) == 1 {
                self.resident.fetch_add(1, Ordering::Relaxed);
                self.counters.pages_found_present.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !self.states.is_resident(page) {
            return Err(Error::Unresolved { gpa });
        }
        if !fault_mapped {
            // The page was mapped by someone else: another fault in its run
            // (whose ioctl woke the waiters it knew of, maybe not us) or
            // found present. Wake the faulting thread ourselves.
            self.uffd.wake(base + page * PAGE_SIZE, PAGE_SIZE).map_err(|source| Error::Resolve { gpa, source })?;
        }
        if resolved == 0 {
            self.counters.faults_already_resident.fetch_add(1, Ordering::Relaxed);
            return Ok(Resolution::AlreadyResident);
        }
        if self.policy.dormant {
            self.counters.pages_zero_filled.fetch_add(resolved, Ordering::Relaxed);
            Ok(Resolution::ZeroFilled { pages: resolved })
        } else {
            self.counters.pages_copied.fetch_add(resolved, Ordering::Relaxed);
            Ok(Resolution::Copied { pages: resolved })
        }
    }

    /// Reserves up to `want` pages of the budget; returns how many.
    fn reserve(&self, want: u64) -> u64 {
        let Some(budget) = self.policy.budget_pages else {
            self.resident.fetch_add(want, Ordering::Relaxed);
            return want;
        };
        let mut cur = self.resident.load(Ordering::Relaxed);
        loop {
            let take = want.min(budget.saturating_sub(cur));
            if take == 0 {
                return 0;
            }
            match self.resident.compare_exchange_weak(cur, cur + take, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }

    /// Marks mapped pages resident (their budget was reserved already).
    fn account(&self, first: u64, count: u64) {
        let newly = self.states.set_resident(first, count);
        debug_assert_eq!(newly, count, "resolved pages were already resident");
    }

    /// Reads guest memory for the VMM (hypercall buffers) without
    /// materialising anything: resident pages are read from the alias view,
    /// dormant pages read as the zeros they are.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let layout = self.mem.layout();
        let len = buf.len() as u64;
        let region = layout
            .region_of_gpa(gpa)
            .filter(|r| gpa.checked_add(len).is_some_and(|end| end <= r.end()))
            .ok_or(Error::GuestRange { gpa, len })?;
        let mut done = 0usize;
        while done < buf.len() {
            let offset = region.offset + (gpa - region.gpa) + done as u64;
            let in_page = (PAGE_SIZE - offset % PAGE_SIZE).min((buf.len() - done) as u64) as usize;
            let dst = &mut buf[done..done + in_page];
            if self.states.is_resident(offset / PAGE_SIZE) {
                // the page is resident, so reading the alias view
                // materialises nothing; a racing guest write can only tear
                // the bytes the guest itself asked us to read
                self.mem.read_alias(offset, dst);
            } else {
                dst.fill(0);
            }
            done += in_page;
        }
        Ok(())
    }
}
