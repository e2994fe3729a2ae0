/* Page-cache accounting from tracepoints alone (no kprobes): cachestat.bpf.c's programs, which cachestat,
 * cachetop (the per-file configuration: cache_by_file) and the health check load.
 *
 * Per row (a process, or with cache_by_file a process and a file) the kernel counts:
 *   read_pages   pages asked of the page cache by read(2)-family calls: filemap:mm_filemap_get_pages
 *                covers index..last_index. filemap_read() calls filemap_get_pages() once per batch of
 *                folios and each call reports the whole rest of the request, so a call that continues
 *                the same request (same task, file and last_index, a later index) adds nothing. (A
 *                new read that ends on the page the previous one ended on, starting later, is taken for
 *                a continuation: rare outside backward scans.)
 *   fault_pages  pages asked through mmap: filemap:mm_filemap_map_pages (fault-around: the range it
 *                mapped from the cache) plus filemap:mm_filemap_fault (a page fault-around did not find).
 *   added        pages added to the page cache: filemap:mm_filemap_add_to_page_cache fires once per
 *                folio, worth 1 << order pages. Reads, readahead, faults and writes all add pages.
 *   write_added  the part of `added` that writes created: a folio the same task marks dirty right after
 *                adding it (writeback:writeback_dirty_folio with the same inode and index). A page a write
 *                creates was never looked up, so it is no miss.
 *   dirtied      pages marked dirty (writeback_dirty_folio, tp_btf to learn the folio's size).
 * Misses are added - write_added; user space derives hits and the ratio (pagecache.py).
 *
 * Include after vmlinux.h, <bpf/bpf_helpers.h>, <bpf/bpf_tracing.h>, <bpf/bpf_core_read.h> and
 * bpfscope.bpf.h.
 */
#ifndef BPFSCOPE_CACHE_BPF_H
#define BPFSCOPE_CACHE_BPF_H

#define CACHE_MAX_ROWS 65536

/* Rows per process, and per file too when set (cachetop). */
const volatile bool cache_by_file = false;

struct cache_key {
	__u32 tgid;
	__u32 dev; /* the superblock's s_dev, kernel encoding (major << 20 | minor); 0 unless by file */
	__u64 ino; /* 0 unless by file */
	char comm[16];
};

struct cache_counts {
	__u64 read_pages;
	__u64 fault_pages;
	__u64 added;
	__u64 write_added;
	__u64 dirtied;
};

/* What one task did last: the read request in progress, the folio it added last. */
struct cache_task {
	__u64 read_mapping; /* the file's address_space: one per file, as long as it is in memory */
	__u64 read_index;
	__u64 read_last;
	__u32 read_pad;
	__u32 added_pages;
	__u64 added_ino;
	__u64 added_index;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CACHE_MAX_ROWS);
	__type(key, struct cache_key);
	__type(value, struct cache_counts);
} cache_rows SEC(".maps");

/* Totals, never evicted: the system-wide (or filtered) figures do not depend on the rows map. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cache_counts);
} cache_total SEC(".maps");

/* Per-task state in task-local storage: found without hashing or locks, and freed with the task. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct cache_task);
} cache_tasks SEC(".maps");

/* Events whose row did not fit in cache_rows (counted in cache_total all the same). */
__u64 cache_rows_dropped = 0;

enum cache_field { CACHE_READ, CACHE_FAULT, CACHE_ADDED, CACHE_WRITE_ADDED, CACHE_DIRTIED };

static __always_inline void cache_add_to(struct cache_counts *c, enum cache_field field, __u64 pages)
{
	switch (field) {
	case CACHE_READ:
		__sync_fetch_and_add(&c->read_pages, pages);
		break;
	case CACHE_FAULT:
		__sync_fetch_and_add(&c->fault_pages, pages);
		break;
	case CACHE_ADDED:
		__sync_fetch_and_add(&c->added, pages);
		break;
	case CACHE_WRITE_ADDED:
		__sync_fetch_and_add(&c->write_added, pages);
		break;
	case CACHE_DIRTIED:
		__sync_fetch_and_add(&c->dirtied, pages);
		break;
	}
}

static __always_inline void cache_count(__u32 dev, __u64 ino, enum cache_field field, __u64 pages)
{
	struct cache_counts *c, zero = {};
	struct cache_key key = {};
	__u32 idx = 0;

	c = bpf_map_lookup_elem(&cache_total, &idx);
	if (c)
		cache_add_to(c, field, pages); /* per-CPU: no other writer, but the helper keeps one path */
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	if (cache_by_file) {
		key.dev = dev;
		key.ino = ino;
	}
	bpf_get_current_comm(key.comm, sizeof(key.comm));
	c = bpf_map_lookup_elem(&cache_rows, &key);
	if (!c) {
		c = bs_insert(&cache_rows, &key, &zero, &cache_rows_dropped);
		if (!c)
			return;
	}
	cache_add_to(c, field, pages);
}

static __always_inline struct cache_task *cache_task_state(void)
{
	return bpf_task_storage_get(&cache_tasks, bpf_get_current_task_btf(), 0,
				    BPF_LOCAL_STORAGE_GET_F_CREATE);
}

/* The file a mapping belongs to, as the filemap tracepoints name it: i_ino and the superblock's s_dev
 * (a block device's inode, without a superblock of its own, by its i_rdev). BTF tracepoints hand over
 * the kernel's pointers, which spares the kernel from formatting a trace record at every read. */
static __always_inline void cache_file_of(struct address_space *mapping, __u32 *dev, __u64 *ino)
{
	struct super_block *sb;
	struct inode *host;

	*dev = 0;
	*ino = 0;
	if (!cache_by_file)
		return; /* rows per process only: the file is no part of their key, spare each read */
	host = BPF_CORE_READ(mapping, host);
	sb = BPF_CORE_READ(host, i_sb);

	*ino = BPF_CORE_READ(host, i_ino);
	*dev = sb ? BPF_CORE_READ(sb, s_dev) : BPF_CORE_READ(host, i_rdev);
}

SEC("tp_btf/mm_filemap_get_pages")
int BPF_PROG(cache_get_pages, struct address_space *mapping, unsigned long index, unsigned long last)
{
	struct cache_task *t;
	__u64 ino;
	__u32 dev;

	/* The kernel passes last_index already inclusive, as the classic record shows it. */
	if (!mapping || last < index || !bs_task_selected())
		return 0;
	t = cache_task_state();
	if (t) {
		bool continued = t->read_mapping == (__u64)mapping && t->read_last == last &&
				 index > t->read_index;
		t->read_mapping = (__u64)mapping;
		t->read_last = last;
		t->read_index = index;
		if (continued)
			return 0;
	}
	cache_file_of(mapping, &dev, &ino);
	cache_count(dev, ino, CACHE_READ, last - index + 1);
	return 0;
}

SEC("tp_btf/mm_filemap_map_pages")
int BPF_PROG(cache_map_pages, struct address_space *mapping, unsigned long index, unsigned long last)
{
	__u64 ino;
	__u32 dev;

	if (!mapping || last < index || !bs_task_selected())
		return 0;
	cache_file_of(mapping, &dev, &ino);
	cache_count(dev, ino, CACHE_FAULT, last - index + 1);
	return 0;
}

SEC("tp_btf/mm_filemap_fault")
int BPF_PROG(cache_fault, struct address_space *mapping, unsigned long index)
{
	__u64 ino;
	__u32 dev;

	if (!mapping || !bs_task_selected())
		return 0;
	cache_file_of(mapping, &dev, &ino);
	cache_count(dev, ino, CACHE_FAULT, 1);
	return 0;
}

/* Kept a classic tracepoint: the record carries the folio's order, and additions are rare next to reads
 * (one per folio brought in, at disk speed). */
SEC("tracepoint/filemap/mm_filemap_add_to_page_cache")
int cache_add(struct trace_event_raw_mm_filemap_op_page_cache *ctx)
{
	/* Fields read once into locals: the verifier rejects a ctx pointer the compiler offsets. */
	__u64 ino = ctx->i_ino, index = ctx->index;
	__u32 dev = ctx->s_dev, pages = 1U << (ctx->order & 31);
	struct cache_task *t;

	if (!bs_task_selected())
		return 0;
	t = cache_task_state();
	if (t) {
		t->added_ino = ino;
		t->added_index = index;
		t->added_pages = pages;
	}
	cache_count(dev, ino, CACHE_ADDED, pages);
	return 0;
}

/* memdesc_flags_t wraps the flags word since 6.18; before, folio->flags was the word itself. */
struct folio___flags_word {
	unsigned long flags;
} __attribute__((preserve_access_index));

static __always_inline __u32 cache_folio_pages(struct folio *folio)
{
	unsigned long flags;

	if (bpf_core_type_exists(memdesc_flags_t))
		flags = BPF_CORE_READ(folio, flags.f);
	else
		flags = BPF_CORE_READ((struct folio___flags_word *)folio, flags);
	if (!(flags & (1UL << bpf_core_enum_value(enum pageflags, PG_head))))
		return 1;
	/* A large folio keeps its order in the low byte of _flags_1 (folio_large_order()). */
	return 1U << (BPF_CORE_READ(folio, _flags_1) & 31);
}

SEC("tp_btf/writeback_dirty_folio")
int BPF_PROG(cache_dirty, struct folio *folio, struct address_space *mapping)
{
	struct cache_task *t;
	struct inode *host;
	__u64 ino, index;
	__u32 dev, pages;

	/* The verifier knows both may be NULL and allows no arithmetic on them before a check. */
	if (!folio || !mapping || !bs_task_selected())
		return 0;
	host = BPF_CORE_READ(mapping, host);
	ino = BPF_CORE_READ(host, i_ino);
	dev = BPF_CORE_READ(host, i_sb, s_dev);
	index = BPF_CORE_READ(folio, index);
	pages = cache_folio_pages(folio);
	cache_count(dev, ino, CACHE_DIRTIED, pages);
	t = bpf_task_storage_get(&cache_tasks, bpf_get_current_task_btf(), 0, 0);
	if (t && t->added_pages && t->added_ino == ino && t->added_index == index) {
		cache_count(dev, ino, CACHE_WRITE_ADDED, t->added_pages);
		t->added_pages = 0;
	}
	return 0;
}

/* cachetop's names: the first time a file gets a page, its dentry chain up to the file system's root,
 * leaf first, CACHE_NAME_DEPTH names at most. User space joins them under the mount point of s_dev, and
 * prefers the path of a descriptor a process holds open; this is the fallback for files already closed
 * (a deeper path shows its last CACHE_NAME_DEPTH names). Loaded with cache_by_file only. */
#define CACHE_NAME_DEPTH 12
#define CACHE_NAME_LEN 64

struct cache_file {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

struct cache_name {
	__u32 depth; /* names filled in */
	__u32 complete; /* reached the file system's root */
	char names[CACHE_NAME_DEPTH][CACHE_NAME_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cache_file);
	__type(value, struct cache_name);
} cache_names SEC(".maps");

/* Too big for the BPF stack: built in a per-CPU scratch slot. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cache_name);
} cache_name_scratch SEC(".maps");

SEC("tp_btf/mm_filemap_add_to_page_cache")
int BPF_PROG(cache_name_file, struct folio *folio)
{
	struct cache_file key = {};
	struct cache_name *name;
	struct dentry *d, *parent;
	struct hlist_node *alias;
	struct inode *host;
	__u32 zero = 0;
	int i;

	if (!folio || !bs_task_selected())
		return 0;
	host = BPF_CORE_READ(folio, mapping, host);
	if (!host)
		return 0;
	key.dev = BPF_CORE_READ(host, i_sb, s_dev);
	key.ino = BPF_CORE_READ(host, i_ino);
	if (bpf_map_lookup_elem(&cache_names, &key))
		return 0;
	name = bpf_map_lookup_elem(&cache_name_scratch, &zero);
	if (!name)
		return 0;
	name->depth = 0;
	name->complete = 0;
	/* Any one of the inode's names will do (a hard-linked file has several). */
	alias = BPF_CORE_READ(host, i_dentry.first);
	if (!alias)
		return 0;
	d = (void *)alias - bpf_core_field_offset(struct dentry, d_u.d_alias);
	for (i = 0; i < CACHE_NAME_DEPTH; i++) {
		bpf_probe_read_kernel_str(name->names[i], CACHE_NAME_LEN, BPF_CORE_READ(d, d_name.name));
		name->depth = i + 1;
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d) {
			name->complete = 1;
			break;
		}
		d = parent;
	}
	/* An LRU map makes room for a new file by forgetting an old one: nothing to count as dropped. */
	bs_insert(&cache_names, &key, name, NULL);
	return 0;
}

#endif
