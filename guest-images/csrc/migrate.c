/* migrate mode=M mib=N rounds=R: vCPU migration between the nodes of a pod.
 *
 * mode=0 (tour): vCPU 0 fills N MiB with a pattern, then moves itself to
 * every node in turn (HC_MIGRATE), R rounds; after every move it checks that
 * it runs where it asked to (HC_INFO), that six callee-saved registers set
 * just before the move hold their values, that a canary on its stack
 * survived, that the pattern's checksum is unchanged, and that the clock
 * (HC_CLOCK_NS) did not go back. Exits 0 when all held.
 *
 * The tour also times, by the same clock, a remote write fault beside the
 * move: after every move (and the checksum) it writes two pages the node it
 * left wrote last, each an ownership transfer. On a host whose idle CPUs
 * are slow to wake, what the pod did just before counts as much as the
 * work itself, so each is timed in two conditions: cold (the other node
 * idle for as long as the checksum takes, tens of milliseconds: the first
 * page, after the checksum; a move of an odd round, after the guest spun
 * without exits for as long as its last checksum took) and warm (right
 * after the other node worked for this vCPU: the second page, after the
 * first; a move of an even round, after the two faults). Prints the
 * medians, and the clock read's own cost (two reads back to back).
 *
 * mode=1 (follow): the data lives on another node: vCPU 0 moves to node 1,
 * writes N MiB there, moves back to node 0 and reads it all R times. With
 * the migration policy on, the vCPU follows its data to node 1 after a
 * few remote faults; with it off, every page is pulled to node 0. Prints
 * where it ended and the checksum (a function of N only).
 *
 * mode=2: asks to move to a node outside the pod (shoal ends the VM).
 *
 * mode=4 (shared): the data is read on one node while another owns it,
 * then the owner needs the room: vCPU 0 moves to node 1 and writes N MiB,
 * moves to node 0 and reads them (read copies there), moves back to node 1
 * and writes N MiB more, then reads all 2N MiB on node 1 and again on node
 * 0. Under a --node-memory that holds N MiB and a little, node 1 must evict
 * pages node 0 reads. Prints both checksums (a function of N only); exits
 * 1 when they differ.
 *
 * mode=3 (ipis): vCPU 1 sends vCPU 0 `ipis=K` IPIs while vCPU 0 moves
 * around every node (`rounds` tours) and counts them with HC_WAIT_IPI: an
 * IPI posted before a move goes with it, one sent after follows it. Exits
 * 0 when exactly K arrived (none lost, none doubled) and every move was
 * made. vCPU 1 is paced by vCPU 0's moves (vCPU 0 sends it an IPI after
 * each), a share of the K after each move, so IPIs fall between all the
 * moves however fast either vCPU runs: unpaced, vCPU 1 could send all K
 * before vCPU 0 had made its moves, and the guest ended early. */
#include "shoal.h"

static u64 migrate_to(u64 node, u64 *saved)
{
	u64 ret;
	/* the registers a move must keep, set right before the hypercall and
	 * read right after it */
	__asm__ volatile("mov $0x1111111111111111, %%rbx\n\t"
			 "mov $0x2222222222222222, %%r12\n\t"
			 "mov $0x3333333333333333, %%r13\n\t"
			 "mov $0x4444444444444444, %%r14\n\t"
			 "mov $0x5555555555555555, %%r15\n\t"
			 "outl %%eax, %%dx\n\t"
			 "mov %%rbx, 0(%[s])\n\t"
			 "mov %%r12, 8(%[s])\n\t"
			 "mov %%r13, 16(%[s])\n\t"
			 "mov %%r14, 24(%[s])\n\t"
			 "mov %%r15, 32(%[s])\n\t"
			 : "=a"(ret)
			 : "a"((u64)SHOAL_HC_MIGRATE), "d"((u64)SHOAL_HC_PORT), "D"(node), [s] "S"(saved)
			 : "rbx", "r12", "r13", "r14", "r15", "rcx", "memory");
	return ret;
}

static int regs_kept(const u64 *saved)
{
	static const u64 want[5] = { 0x1111111111111111ul, 0x2222222222222222ul, 0x3333333333333333ul,
				     0x4444444444444444ul, 0x5555555555555555ul };
	for (int i = 0; i < 5; i++)
		if (saved[i] != want[i])
			return 0;
	return 1;
}

struct sum {
	u64 value;
	u64 pages;
};

static void fill_piece(u64 base, u64 len, u64 offset, void *p)
{
	(void)p;
	for (u64 o = 0; o < len; o += PAGE)
		shoal_fill_words((u64 *)(base + o), shoal_mix64((offset + o) / PAGE), PAGE / 8);
}

/* fills what lies at or past the offset `*p` */
static void fill_after(u64 base, u64 len, u64 offset, void *p)
{
	u64 from = *(const u64 *)p;
	for (u64 o = 0; o < len; o += PAGE)
		if (offset + o >= from)
			shoal_fill_words((u64 *)(base + o), shoal_mix64((offset + o) / PAGE), PAGE / 8);
}

static void sum_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct sum *s = p;
	for (u64 o = 0; o < len; o += PAGE) {
		u64 v = shoal_mix64((offset + o) / PAGE);
		if (shoal_find_mismatch((const u64 *)(base + o), v, PAGE / 8) != PAGE / 8)
			v = ~v; /* a wrong page changes the checksum */
		s->value = shoal_mix64(s->value ^ v);
		s->pages++;
	}
}

static u64 checksum(const struct shoal_boot_info *bi, u64 bytes)
{
	struct sum s = { 0, 0 };
	shoal_for_free(bi, bytes, sum_piece, &s);
	return s.value;
}

/* per round (a move to every node and back where it started: the clocks of
 * two nodes may differ a little, and a move one way gains what the move
 * back loses), the mean move; the median of the first MAX_TIMED rounds is
 * not at the mercy of one move the host scheduler delayed, as the mean is */
#define MAX_TIMED 256
static u64 round_times[MAX_TIMED];
/* per move after the first (whose writes may find the pages dormant) */
static u64 fault_cold[MAX_TIMED], fault_warm[MAX_TIMED], clock_times[MAX_TIMED];
/* written after every move, and by nothing else */
static volatile u64 probe[2][PAGE / 8] __attribute__((aligned(PAGE)));

/* no exits for `ns`: the other nodes' threads go idle meanwhile */
static void spin_ns(u64 ns)
{
	u64 start = shoal_clock_ns();
	while (shoal_clock_ns() - start < ns)
		for (volatile u64 i = 0; i < 1000; i++)
			;
}

static u64 median(u64 *v, u64 n)
{
	for (u64 i = 1; i < n; i++)
		for (u64 j = i; j > 0 && v[j - 1] > v[j]; j--) {
			u64 t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return n ? v[n / 2] : 0;
}

static u64 tour(const struct shoal_boot_info *bi, u64 bytes, u64 rounds)
{
	u64 nodes = shoal_info(SHOAL_INFO_NUM_NODES);
	volatile u64 canary[16];
	for (u64 i = 0; i < 16; i++)
		canary[i] = shoal_mix64(i + 77);
	shoal_for_free(bi, bytes, fill_piece, 0);
	u64 want = checksum(bi, bytes), moves = 0, move_ns = 0, timed = 0, idle_ns = 0;
	u64 round_cold[MAX_TIMED / 2], round_warm[MAX_TIMED / 2], n_cold = 0, n_warm = 0;
	for (u64 r = 0; r < rounds; r++) {
		for (u64 k = 0; k < nodes; k++) {
			u64 node = (k + 1) % nodes;
			u64 saved[5] = { 0 };
			if (r % 2 == 1)
				spin_ns(idle_ns);
			u64 t0 = shoal_clock_ns();
			u64 ret = migrate_to(node, saved);
			u64 t1 = shoal_clock_ns();
			if (t1 < t0) {
				shoal_printf("migrate: FAILED: the clock went back across move %lu (%lu, then %lu)\n",
					     moves + 1, t0, t1);
				return 1;
			}
			move_ns += t1 - t0;
			if (r < MAX_TIMED)
				round_times[r] += (t1 - t0) / nodes;
			moves++;
			u64 here = shoal_info(SHOAL_INFO_NODE_ID);
			if (ret != 0 || here != node || !regs_kept(saved)) {
				shoal_printf("migrate: FAILED: move %lu to node %lu: returned %lu, runs on node %lu, registers %s\n",
					     moves, node, ret, here, regs_kept(saved) ? "kept" : "LOST");
				return 1;
			}
			for (u64 i = 0; i < 16; i++) {
				if (canary[i] != shoal_mix64(i + 77)) {
					shoal_printf("migrate: FAILED: the stack changed after move %lu\n", moves);
					return 1;
				}
			}
			u64 s0 = shoal_clock_ns();
			u64 got = checksum(bi, bytes);
			idle_ns = shoal_clock_ns() - s0;
			if (got != want) {
				shoal_printf("migrate: FAILED: checksum %lx after move %lu, wanted %lx\n", got, moves, want);
				return 1;
			}
			u64 c0 = shoal_clock_ns();
			u64 c1 = shoal_clock_ns();
			probe[0][0] = moves;
			u64 c2 = shoal_clock_ns();
			probe[1][0] = moves;
			u64 c3 = shoal_clock_ns();
			if (moves >= 2 && timed < MAX_TIMED) {
				clock_times[timed] = c1 - c0;
				fault_cold[timed] = c2 - c1;
				fault_warm[timed] = c3 - c2;
				timed++;
			}
		}
		if (r < MAX_TIMED && r % 2 == 1)
			round_cold[n_cold++] = round_times[r];
		else if (r < MAX_TIMED)
			round_warm[n_warm++] = round_times[r];
	}
	shoal_printf("migrate: tour ok: %lu moves over %lu nodes, registers, stack and checksum=0x%lx kept, "
		     "move_ns=%lu move_p50_ns=%lu move_warm_p50_ns=%lu move_cold_p50_ns=%lu fault_warm_p50_ns=%lu "
		     "fault_cold_p50_ns=%lu clock_p50_ns=%lu\n",
		     moves, nodes, want, move_ns / moves, median(round_times, rounds < MAX_TIMED ? rounds : MAX_TIMED),
		     median(round_warm, n_warm), median(round_cold, n_cold), median(fault_warm, timed),
		     median(fault_cold, timed), median(clock_times, timed));
	return 0;
}

static struct {
	volatile u64 sent;
	u8 pad[PAGE - 8];
} ipi_done __attribute__((aligned(4096)));

u64 shoal_ap_main(const struct shoal_boot_info *bi)
{
	if (shoal_arg_or(bi, "mode", 0) == 3 && bi->vcpu_id == 1) {
		u64 k = shoal_arg_or(bi, "ipis", 100), rounds = shoal_arg_or(bi, "rounds", 1);
		u64 total = rounds * shoal_info(SHOAL_INFO_NUM_NODES), moved = 0, sent = 0;
		while (sent < k) {
			/* a share before the first move, one after each, the rest
			 * after the last */
			u64 due = moved >= total ? k : k * (moved + 1) / (total + 1);
			for (; sent < due; sent++) {
				shoal_hc(SHOAL_HC_IPI, 0, 0, 0);
				/* a little time between IPIs, so that moves fall between them */
				for (volatile u64 spin = 0; spin < 200; spin++)
					;
			}
			if (sent < k)
				moved += shoal_hc(SHOAL_HC_WAIT_IPI, 0, 0, 0); /* vCPU 0 moved */
		}
		__atomic_store_n(&ipi_done.sent, k, __ATOMIC_SEQ_CST);
	}
	for (;;)
		__asm__ volatile("hlt");
}

static u64 ipis(u64 rounds, u64 k)
{
	u64 nodes = shoal_info(SHOAL_INFO_NUM_NODES), got = 0, moves = 0, saved[5];
	if (shoal_info(SHOAL_INFO_NUM_VCPUS) < 2) {
		shoal_printf("migrate: error: mode=3 needs 2 vCPUs\n");
		return 2;
	}
	/* move while IPIs arrive: every few waits, to the next node, telling
	 * vCPU 1 after each move */
	for (u64 turn = 0; moves < rounds * nodes || __atomic_load_n(&ipi_done.sent, __ATOMIC_SEQ_CST) == 0 || got < k;
	     turn++) {
		got += shoal_hc(SHOAL_HC_WAIT_IPI, 1000000, 0, 0); /* 1 ms */
		if (moves < rounds * nodes && turn % 3 == 0) {
			migrate_to((shoal_info(SHOAL_INFO_NODE_ID) + 1) % nodes, saved);
			moves++;
			shoal_hc(SHOAL_HC_IPI, 1, 0, 0);
		}
		if (got > k)
			break;
		if (turn > 100000) {
			shoal_printf("migrate: FAILED: %lu of %lu IPIs after %lu waits\n", got, k, turn);
			return 1;
		}
	}
	/* anything still coming would be a double: wait a little more */
	for (int i = 0; i < 50; i++)
		got += shoal_hc(SHOAL_HC_WAIT_IPI, 2000000, 0, 0);
	if (got != k) {
		shoal_printf("migrate: FAILED: %lu IPIs arrived, %lu were sent\n", got, k);
		return 1;
	}
	shoal_printf("migrate: ipis ok: %lu IPIs while moving %lu times over %lu nodes\n", got, moves, nodes);
	return 0;
}

static u64 follow(const struct shoal_boot_info *bi, u64 bytes, u64 rounds)
{
	u64 saved[5];
	if (shoal_info(SHOAL_INFO_NUM_NODES) < 2) {
		shoal_printf("migrate: error: mode=1 needs a pod of 2 or more nodes\n");
		return 2;
	}
	migrate_to(1, saved);
	shoal_for_free(bi, bytes, fill_piece, 0);
	migrate_to(0, saved);
	u64 t0 = shoal_clock_ns(), sum = 0;
	for (u64 r = 0; r < rounds; r++)
		sum = checksum(bi, bytes);
	u64 t1 = shoal_clock_ns();
	shoal_printf("migrate: follow: checksum=0x%lx read_ns=%lu ended on node %lu\n", sum, t1 - t0,
		     shoal_info(SHOAL_INFO_NODE_ID));
	return 0;
}

static u64 shared(const struct shoal_boot_info *bi, u64 bytes)
{
	u64 saved[5];
	if (shoal_info(SHOAL_INFO_NUM_NODES) < 2) {
		shoal_printf("migrate: error: mode=4 needs a pod of 2 or more nodes\n");
		return 2;
	}
	if (2 * bytes > shoal_free_bytes(bi)) {
		shoal_printf("migrate: error: mode=4 needs 2 x mib of free guest RAM\n");
		return 2;
	}
	migrate_to(1, saved);
	shoal_for_free(bi, bytes, fill_piece, 0);
	migrate_to(0, saved);
	u64 first = checksum(bi, bytes);
	migrate_to(1, saved);
	shoal_for_free(bi, 2 * bytes, fill_after, &bytes);
	u64 on1 = checksum(bi, 2 * bytes);
	migrate_to(0, saved);
	u64 on0 = checksum(bi, 2 * bytes);
	shoal_printf("migrate: shared: first=0x%lx checksum=0x%lx on node 1, checksum0=0x%lx on node 0\n", first, on1,
		     on0);
	if (on0 != on1) {
		shoal_printf("migrate: FAILED: the two nodes read different data\n");
		return 1;
	}
	return 0;
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mode = shoal_arg_or(bi, "mode", 0), mib = shoal_arg_or(bi, "mib", 1), rounds = shoal_arg_or(bi, "rounds", 1);
	if (mib * MIB > shoal_free_bytes(bi)) {
		shoal_printf("migrate: error: mib=%lu is more than the free guest RAM\n", mib);
		return 2;
	}
	switch (mode) {
	case 0: return tour(bi, mib * MIB, rounds);
	case 1: return follow(bi, mib * MIB, rounds);
	case 3: return ipis(rounds, shoal_arg_or(bi, "ipis", 100));
	case 4: return shared(bi, mib * MIB);
	case 2: {
		/* a move to the node one past the last: shoal must end the VM */
		u64 saved[5];
		migrate_to(shoal_info(SHOAL_INFO_NUM_NODES), saved);
		shoal_printf("migrate: FAILED: a move outside the pod returned\n");
		return 1;
	}
	default:
		shoal_printf("migrate: error: mode=%lu; use 0 (tour), 1 (follow), 2 (outside), 3 (ipis) or 4 (shared)\n", mode);
		return 2;
	}
}
