"""Page cache and VFS: lookups, hits and misses (cache.bpf.h), files read and written (vfs.bpf.h), dirty
pages and writeback."""

TOOLS = {
    "cachestat": "Page-cache lookups, hits, misses, hit ratio, dirtied pages.",
    "cachetop": "Files and processes that miss the page cache most, with paths.",
    "fincore": "How much of each file is in the page cache, and dirty.",
    "vfsstat": "VFS reads, writes, opens, creates, fsyncs per second.",
    "filetop": "Top files by bytes read and written, with process and path.",
    "writeback": "Dirty and writeback pages, flushes, pages per flush, reason.",
}
RULES = [(40, "health:PageCacheRule"), (50, "health:VfsRule"), (60, "health:WritebackRule")]
