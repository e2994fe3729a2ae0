/* What the file system tools (vfsstat, filetop) share on the BPF side. Include after vmlinux.h,
 * <bpf/bpf_helpers.h> and <bpf/bpf_core_read.h>.
 */
#ifndef BPFSCOPE_VFS_BPF_H
#define BPFSCOPE_VFS_BPF_H

/* The current task's struct file for `fd` (task->files->fdt->fd[fd], bounded by max_fds), or NULL. */
static __always_inline struct file *bs_fd_file(unsigned long fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *file = NULL;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

#endif
