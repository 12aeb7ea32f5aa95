/* QMP `query-memory` (and `mdvm ctl query-memory`): guest RAM as mm/ sees it
 * (docs/memdesc.md): size and backing, 4 KiB frames by memdesc type, folios
 * by order, host hugepages in use with their occupancy, metadata bytes. */
#include <stdio.h>
#include "../mm/mm.h"
#include "cmd_compact.h"
#include "commands.h"
#include "qmp.h"
#include "vm.h"

static json_t *memory_stats_json(struct guest_mem *gm)
{
	struct mm_stats st;
	json_t *pages = json_object(), *folios = json_object(), *occ = json_object();
	char key[16];

	mm_query_stats(gm, &st);
	for (int t = 0; t < MEMDESC_NR_TYPES; t++)
		json_object_set_new(pages, memdesc_type_name((enum memdesc_type)t),
				    json_integer((json_int_t)st.pages[t]));
	for (int k = 0; k <= MM_MAX_ORDER; k++) {
		snprintf(key, sizeof(key), "order-%d", k);
		json_object_set_new(folios, key, json_integer((json_int_t)st.folios[k]));
	}
	for (unsigned b = 0; b < MM_OCC_BUCKETS; b++)
		json_object_set_new(occ, mm_occupancy_label(b), json_integer((json_int_t)st.occupancy[b]));
	return json_pack("{s:I,s:s,s:s,s:o,s:o,s:I,s:I,s:o,s:I,s:{s:I,s:I,s:I,s:I},s:I,s:I,s:{s:i,s:i},s:i}",
			 "ram-size", (json_int_t)st.ram_size,
			 "backing", mm_backing_name(st.backing),
			 "backing-note", mm_backing_note(gm),
			 "pages", pages,
			 "folios", folios,
			 "hugepages-in-use", (json_int_t)st.hugepages_in_use,
			 "hugepages-total", (json_int_t)st.hugepages_total,
			 "occupancy-histogram", occ,
			 "metadata-bytes", (json_int_t)st.metadata_bytes,
			 "metadata",
			 "memdesc", (json_int_t)st.memdesc_bytes,
			 "folios", (json_int_t)st.folio_bytes,
			 "pool", (json_int_t)st.pool_bytes,
			 "leaf-tables", (json_int_t)st.leaf_tables,
			 "populated-bytes", (json_int_t)st.populated_bytes,
			 "first-touch-faults", (json_int_t)st.faults,
			 "memslots", "registered", (int)st.slots_registered, "total", (int)st.slots_total,
			 "dirty-generation", (int)st.dirty_gen);
}

static void cmd_query_memory(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = { { NULL } };
	struct vm *vm = opaque;

	if (!args_check(req, args, spec))
		return;
	json_t *o = memory_stats_json(vm_mem(vm));
	json_object_set_new(o, "fragmentation", compact_fragmentation_json(vm_mem(vm)));
	qmp_reply_ok(req, o);
}

void commands_register_memory(struct vm *vm)
{
	qmp_register("query-memory", cmd_query_memory, vm);
}
