/* hello: prints a line on the serial console and one through HC_PRINT. */
#include "shoal.h"

u64 shoal_main(const struct shoal_boot_info *bi)
{
	shoal_printf("hello from shoal: vcpu %lu of %lu, node %lu of %lu, %lu MiB of RAM\n", bi->vcpu_id,
		     bi->num_vcpus, bi->node_id, bi->num_nodes, bi->mem_bytes / MIB);
	shoal_hc_print("hello through the print hypercall\n");
	return 0;
}
