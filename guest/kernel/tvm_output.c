// SPDX-License-Identifier: GPL-2.0
/*
 * tvm_output: the output channel of a TVM guest's stage (TVM's own driver,
 * built into the guest kernel by `crates/pyrovm/src/kernel.rs`).
 *
 * Why: under TCG every guest instruction is emulated, and a pipe write runs
 * ~300 of them in pipe_write (pipe mutex, page merge, sb_start_write_trylock
 * and file_update_time on every write) on top of what a /dev/null write
 * costs: a program writing one line per write(2) ran at about half its
 * /dev/null speed through a pipe however cheaply the agent read it
 * (docs/performance.md, "Output relay"). A write here is one copy into a
 * ring under a mutex, and the two standard streams share one ring as
 * records, so the agent gets the exact order of writes across stdout and
 * stderr from the ring itself.
 *
 * Nodes (devtmpfs; misc major, dynamic minors):
 *   /dev/tvm-output  0600  the reader. Each open makes a new channel (a
 *                          ring of TVM_OUT_RING bytes) and makes it current.
 *   /dev/tvm-stdout  0222  a writer of the current channel's stdout;
 *   /dev/tvm-stderr  0222  of its stderr. The agent opens both right after
 *                          the reader and gives them to the program as fds
 *                          1 and 2; reopening /dev/stdout (/proc/self/fd/1)
 *                          lands here again and joins the same channel.
 *
 * Writers behave as a pipe's: a write blocks while the ring lacks room (no
 * more than PIPE_BUF bytes are ever split), O_NONBLOCK gives EAGAIN, a write
 * after the reader has gone gives EPIPE and SIGPIPE, lseek gives ESPIPE,
 * poll reports room. The reader's read(2) returns whole records, each a
 * native-endian u32 header (bit 31: stderr; bits 0-30: length) followed by
 * that many bytes, and needs a buffer of at least TVM_OUT_READ_MIN bytes;
 * it blocks while the ring is empty and writers remain, and returns 0 (end
 * of file) once every writer file is closed; from then on the writer
 * nodes refuse to open (ENXIO), as nothing would read what they got. FIONREAD gives the bytes
 * (headers included) waiting. Consecutive writes to one stream merge into
 * one record while the reader has not taken it.
 *
 * The reader's wait queue is woken only by a write that finds the ring
 * empty, so a reader that waits for a quiet spell to end costs the writer
 * one wake-up per spell, not one per write.
 *
 * A write of at most PIPE_BUF bytes that fits without wrapping (nearly every
 * write of a program writing line by line) copies inline, eight bytes at a
 * time: copy_from_user ends in rep movsb from 64 bytes up, which TCG runs
 * one emulated iteration per byte (docs/performance.md, "Output relay").
 */
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mutex.h>
#include <linux/limits.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/uio.h>
#include <asm/unaligned.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <asm/ioctls.h>

#define TVM_OUT_RING (1u << 20)		/* bytes; a power of two */
#define TVM_OUT_REC_MAX (64u << 10)	/* payload bytes of one record */
#define TVM_OUT_HDR 4u
#define TVM_OUT_READ_MIN (TVM_OUT_HDR + TVM_OUT_REC_MAX)
#define TVM_OUT_STDERR 0x80000000u

struct tvm_chan {
	struct kref ref;
	struct mutex lock;
	wait_queue_head_t rwait;	/* the reader: data or end of file */
	wait_queue_head_t wwait;	/* writers: room, or the reader gone */
	u8 *ring;
	u32 head;			/* free-running: next byte to read */
	u32 tail;			/* free-running: next byte to write */
	u32 last;			/* header offset of the newest record */
	u32 last_hdr;			/* its header (stream bit | length) */
	bool has_last;			/* the newest record is still unread */
	unsigned int writers;
	bool writers_seen;
	bool eof_sent;			/* the reader got end of file: closed for good */
	bool reader_gone;
};

struct tvm_writer {
	struct tvm_chan *chan;
	u32 stream;			/* 0 or TVM_OUT_STDERR */
};

static DEFINE_MUTEX(tvm_current_lock);
static struct tvm_chan *tvm_current;	/* holds a reference */

static void tvm_chan_free(struct kref *ref)
{
	struct tvm_chan *ch = container_of(ref, struct tvm_chan, ref);

	vfree(ch->ring);
	kfree(ch);
}

static void tvm_chan_put(struct tvm_chan *ch)
{
	kref_put(&ch->ref, tvm_chan_free);
}

static u32 tvm_used(const struct tvm_chan *ch)
{
	return ch->tail - ch->head;
}

/* Copies n bytes into the ring at free-running offset at (wrapping). */
static void tvm_ring_put(struct tvm_chan *ch, u32 at, const void *src, u32 n)
{
	u32 off = at & (TVM_OUT_RING - 1);
	u32 first = min(n, TVM_OUT_RING - off);

	memcpy(ch->ring + off, src, first);
	memcpy(ch->ring, (const u8 *)src + first, n - first);
}

static u32 tvm_ring_get_hdr(const struct tvm_chan *ch, u32 at)
{
	u32 off = at & (TVM_OUT_RING - 1);
	u32 first = min(TVM_OUT_HDR, TVM_OUT_RING - off);
	u32 hdr;

	memcpy(&hdr, ch->ring + off, first);
	memcpy((u8 *)&hdr + first, ch->ring, TVM_OUT_HDR - first);
	return hdr;
}

/* Where a write's bytes come from: a plain user buffer (write(2), the
 * common case, one copy_from_user) or an iterator (writev, splice). */
struct tvm_src {
	const char __user *ubuf;
	struct iov_iter *iter;
};

/* Copies up to n bytes from src to ring offset at; returns bytes copied
 * (fewer on a fault). */
static size_t tvm_src_copy(struct tvm_chan *ch, struct tvm_src *src, u32 at, size_t n)
{
	u32 off = at & (TVM_OUT_RING - 1);
	size_t first = min_t(size_t, n, TVM_OUT_RING - off);
	size_t done;

	if (src->ubuf) {
		done = first - copy_from_user(ch->ring + off, src->ubuf, first);
		if (done == first && n > first)
			done += (n - first) - copy_from_user(ch->ring, src->ubuf + first, n - first);
		src->ubuf += done;
		return done;
	}
	done = copy_from_iter(ch->ring + off, first, src->iter);
	if (done == first && n > first)
		done += copy_from_iter(ch->ring, n - first, src->iter);
	return done;
}

/* Appends what fits of src's count bytes to stream's newest record (or a new
 * one). Called with ch->lock held; returns bytes taken, or -EFAULT. */
static ssize_t tvm_append(struct tvm_chan *ch, u32 stream, struct tvm_src *src, size_t count)
{
	u32 room = TVM_OUT_RING - tvm_used(ch);
	bool merge = ch->has_last && (ch->last_hdr & TVM_OUT_STDERR) == stream &&
		     (ch->last_hdr & ~TVM_OUT_STDERR) < TVM_OUT_REC_MAX;
	size_t n, got;

	if (merge) {
		n = min_t(size_t, count, TVM_OUT_REC_MAX - (ch->last_hdr & ~TVM_OUT_STDERR));
	} else {
		if (room <= TVM_OUT_HDR)
			return 0;
		room -= TVM_OUT_HDR;
		n = min_t(size_t, count, TVM_OUT_REC_MAX);
	}
	n = min_t(size_t, n, room);
	if (!n)
		return 0;
	if (!merge) {
		got = tvm_src_copy(ch, src, ch->tail + TVM_OUT_HDR, n);
		if (!got)
			return -EFAULT;
		/* The record before is complete: its header goes into the ring. */
		if (ch->has_last)
			tvm_ring_put(ch, ch->last, &ch->last_hdr, TVM_OUT_HDR);
		ch->last = ch->tail;
		ch->last_hdr = stream | (u32)got;
		ch->has_last = true;
		ch->tail += TVM_OUT_HDR + got;
	} else {
		got = tvm_src_copy(ch, src, ch->tail, n);
		if (!got)
			return -EFAULT;
		ch->last_hdr += (u32)got;
		ch->tail += got;
	}
	return got;
}

/* The room a write of count bytes must find before it starts: all of it for
 * a write of at most PIPE_BUF (never split, as a pipe's), else one byte. */
static bool tvm_has_room(const struct tvm_chan *ch, size_t count, size_t written)
{
	u32 room = TVM_OUT_RING - tvm_used(ch);
	size_t need = (written == 0 && count <= PIPE_BUF) ? count : 1;

	return room >= need + TVM_OUT_HDR;
}

static ssize_t tvm_write_src(struct file *file, struct tvm_src *src, size_t count, bool nonblock)
{
	struct tvm_writer *w = file->private_data;
	struct tvm_chan *ch = w->chan;
	size_t written = 0;
	ssize_t ret = 0;

	if (!count)
		return 0;
	mutex_lock(&ch->lock);
	for (;;) {
		u32 before = tvm_used(ch);

		if (ch->reader_gone) {
			if (!written) {
				send_sig(SIGPIPE, current, 0);
				ret = -EPIPE;
			}
			break;
		}
		if (tvm_has_room(ch, count, written)) {
			ssize_t got = tvm_append(ch, w->stream, src, count - written);

			if (got < 0) {
				if (!written)
					ret = got;
				break;
			}
			written += got;
			/*
			 * Only a write into an empty ring can find the reader
			 * asleep, and that holds for every piece of a write: a
			 * write that waited for room may find the ring emptied by
			 * a reader that then went to sleep.
			 */
			if (got && !before)
				wake_up_interruptible_sync_poll(&ch->rwait, EPOLLIN | EPOLLRDNORM);
			if (written == count)
				break;
			if (got)
				continue;
		}
		if (nonblock) {
			if (!written)
				ret = -EAGAIN;
			break;
		}
		if (signal_pending(current)) {
			if (!written)
				ret = -ERESTARTSYS;
			break;
		}
		mutex_unlock(&ch->lock);
		ret = wait_event_interruptible(ch->wwait,
			READ_ONCE(ch->reader_gone) ||
			TVM_OUT_RING - (READ_ONCE(ch->tail) - READ_ONCE(ch->head)) >
				(written == 0 && count <= PIPE_BUF ? count : 0) + TVM_OUT_HDR);
		mutex_lock(&ch->lock);
		if (ret) {
			if (written)
				ret = 0;
			break;
		}
	}
	mutex_unlock(&ch->lock);
	return written ? (ssize_t)written : ret;
}

/*
 * Copies count user bytes to dst inline, eight at a time, then 4, 2, 1 (no
 * call, and no rep movsb, which TCG runs one emulated iteration per byte).
 * false if the source is not readable.
 */
static __always_inline bool tvm_copy_inline(u8 *dst, const char __user *src, u32 count)
{
	if (!user_access_begin(src, count))
		return false;
	while (count >= 8) {
		u64 v;

		unsafe_get_user(v, (const u64 __user *)src, fault);
		put_unaligned(v, (u64 *)dst);
		src += 8;
		dst += 8;
		count -= 8;
	}
	if (count & 4) {
		u32 v;

		unsafe_get_user(v, (const u32 __user *)src, fault);
		put_unaligned(v, (u32 *)dst);
		src += 4;
		dst += 4;
	}
	if (count & 2) {
		u16 v;

		unsafe_get_user(v, (const u16 __user *)src, fault);
		put_unaligned(v, (u16 *)dst);
		src += 2;
		dst += 2;
	}
	if (count & 1) {
		u8 v;

		unsafe_get_user(v, (const u8 __user *)src, fault);
		*dst = v;
	}
	user_access_end();
	return true;
fault:
	user_access_end();
	return false;
}

/*
 * The common case of a write of at most PIPE_BUF bytes, called with the
 * lock held: appends it whole to stream's newest record or as a new one, or
 * returns false (without a change) when the write needs the general path:
 * the reader gone, too little room, a wrap, an unreadable source. *was_empty
 * says whether the ring was empty before (the reader may be asleep).
 */
static __always_inline bool tvm_append_fast(struct tvm_chan *ch, u32 stream, const char __user *buf,
					    u32 count, bool *was_empty)
{
	u32 used = tvm_used(ch);
	u32 off = ch->tail & (TVM_OUT_RING - 1);
	bool merge = ch->has_last && (ch->last_hdr & TVM_OUT_STDERR) == stream &&
		     (ch->last_hdr & ~TVM_OUT_STDERR) + count <= TVM_OUT_REC_MAX;
	u32 hdr = merge ? 0 : TVM_OUT_HDR;

	if (unlikely(ch->reader_gone || TVM_OUT_RING - used < count + TVM_OUT_HDR ||
		     off + hdr + count > TVM_OUT_RING))
		return false;
	if (unlikely(!tvm_copy_inline(ch->ring + off + hdr, buf, count)))
		return false;
	if (merge) {
		ch->last_hdr += count;
	} else {
		/* The record before is complete: its header goes into the ring. */
		if (ch->has_last)
			tvm_ring_put(ch, ch->last, &ch->last_hdr, TVM_OUT_HDR);
		ch->last = ch->tail;
		ch->last_hdr = stream | count;
		ch->has_last = true;
	}
	ch->tail += hdr + count;
	*was_empty = !used;
	return true;
}

static ssize_t tvm_write(struct file *file, const char __user *buf, size_t count, loff_t *ppos)
{
	struct tvm_writer *w = file->private_data;
	struct tvm_chan *ch = w->chan;
	struct tvm_src src = { .ubuf = buf };

	if (likely(count && count <= PIPE_BUF)) {
		bool done, was_empty = false;

		mutex_lock(&ch->lock);
		done = tvm_append_fast(ch, w->stream, buf, count, &was_empty);
		mutex_unlock(&ch->lock);
		if (likely(done)) {
			if (unlikely(was_empty))
				wake_up_interruptible_sync_poll(&ch->rwait, EPOLLIN | EPOLLRDNORM);
			return count;
		}
	}
	return tvm_write_src(file, &src, count, file->f_flags & O_NONBLOCK);
}

static ssize_t tvm_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	struct tvm_src src = { .iter = from };

	return tvm_write_src(iocb->ki_filp, &src, iov_iter_count(from),
			     (iocb->ki_flags & IOCB_NOWAIT) || (iocb->ki_filp->f_flags & O_NONBLOCK));
}

static ssize_t tvm_writer_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	return -EINVAL;
}

static __poll_t tvm_writer_poll(struct file *file, poll_table *wait)
{
	struct tvm_writer *w = file->private_data;
	struct tvm_chan *ch = w->chan;
	__poll_t mask = 0;

	poll_wait(file, &ch->wwait, wait);
	mutex_lock(&ch->lock);
	if (ch->reader_gone)
		mask |= EPOLLERR;
	else if (TVM_OUT_RING - tvm_used(ch) >= PIPE_BUF + TVM_OUT_HDR)
		mask |= EPOLLOUT | EPOLLWRNORM;
	mutex_unlock(&ch->lock);
	return mask;
}

static int tvm_writer_open(struct inode *inode, struct file *file, u32 stream)
{
	struct tvm_writer *w;
	struct tvm_chan *ch;

	w = kmalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	mutex_lock(&tvm_current_lock);
	ch = tvm_current;
	if (ch)
		kref_get(&ch->ref);
	mutex_unlock(&tvm_current_lock);
	if (!ch) {
		kfree(w);
		return -ENXIO;
	}
	mutex_lock(&ch->lock);
	/*
	 * After end of file the reader has stopped: bytes written now would
	 * be lost, so a late opener is refused as a FIFO without a reader
	 * refuses a non-blocking writer.
	 */
	if (ch->reader_gone || ch->eof_sent) {
		mutex_unlock(&ch->lock);
		tvm_chan_put(ch);
		kfree(w);
		return -ENXIO;
	}
	ch->writers++;
	ch->writers_seen = true;
	mutex_unlock(&ch->lock);
	w->chan = ch;
	w->stream = stream;
	file->private_data = w;
	stream_open(inode, file);
	return 0;
}

static int tvm_stdout_open(struct inode *inode, struct file *file)
{
	return tvm_writer_open(inode, file, 0);
}

static int tvm_stderr_open(struct inode *inode, struct file *file)
{
	return tvm_writer_open(inode, file, TVM_OUT_STDERR);
}

static int tvm_writer_release(struct inode *inode, struct file *file)
{
	struct tvm_writer *w = file->private_data;
	struct tvm_chan *ch = w->chan;

	mutex_lock(&ch->lock);
	if (!--ch->writers)
		wake_up_interruptible_poll(&ch->rwait, EPOLLIN | EPOLLHUP);
	mutex_unlock(&ch->lock);
	tvm_chan_put(ch);
	kfree(w);
	return 0;
}

static bool tvm_readable(struct tvm_chan *ch)
{
	return READ_ONCE(ch->tail) != READ_ONCE(ch->head) ||
	       (READ_ONCE(ch->writers_seen) && !READ_ONCE(ch->writers));
}

static ssize_t tvm_reader_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct tvm_chan *ch = file->private_data;
	u32 pos, end, off, first;
	ssize_t ret;

	if (count < TVM_OUT_READ_MIN)
		return -EINVAL;
	mutex_lock(&ch->lock);
	while (ch->tail == ch->head) {
		if (ch->writers_seen && !ch->writers) {
			ch->eof_sent = true;
			mutex_unlock(&ch->lock);
			return 0;
		}
		mutex_unlock(&ch->lock);
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(ch->rwait, tvm_readable(ch));
		if (ret)
			return ret;
		mutex_lock(&ch->lock);
	}
	/* The newest record's length lives in last_hdr while writes merge. */
	if (ch->has_last)
		tvm_ring_put(ch, ch->last, &ch->last_hdr, TVM_OUT_HDR);
	pos = ch->head;
	end = ch->tail;
	while (pos != end) {
		u32 len = tvm_ring_get_hdr(ch, pos) & ~TVM_OUT_STDERR;

		if (pos - ch->head + TVM_OUT_HDR + len > count)
			break;
		pos += TVM_OUT_HDR + len;
	}
	ret = pos - ch->head;
	off = ch->head & (TVM_OUT_RING - 1);
	first = min_t(u32, ret, TVM_OUT_RING - off);
	if (copy_to_user(buf, ch->ring + off, first) ||
	    copy_to_user(buf + first, ch->ring, ret - first)) {
		ret = -EFAULT;
	} else {
		ch->head = pos;
		if (ch->has_last && (s32)(ch->last - pos) < 0)
			ch->has_last = false;
		if (wq_has_sleeper(&ch->wwait))
			wake_up_interruptible_sync_poll(&ch->wwait, EPOLLOUT | EPOLLWRNORM);
	}
	mutex_unlock(&ch->lock);
	return ret;
}

static __poll_t tvm_reader_poll(struct file *file, poll_table *wait)
{
	struct tvm_chan *ch = file->private_data;
	__poll_t mask = 0;

	poll_wait(file, &ch->rwait, wait);
	mutex_lock(&ch->lock);
	if (ch->tail != ch->head)
		mask |= EPOLLIN | EPOLLRDNORM;
	if (ch->writers_seen && !ch->writers)
		mask |= EPOLLHUP;
	mutex_unlock(&ch->lock);
	return mask;
}

static long tvm_reader_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct tvm_chan *ch = file->private_data;
	int n;

	if (cmd != FIONREAD)
		return -ENOTTY;
	mutex_lock(&ch->lock);
	n = tvm_used(ch);
	mutex_unlock(&ch->lock);
	return put_user(n, (int __user *)arg);
}

static int tvm_reader_open(struct inode *inode, struct file *file)
{
	struct tvm_chan *ch, *old;

	if ((file->f_flags & O_ACCMODE) != O_RDONLY)
		return -EINVAL;
	ch = kzalloc(sizeof(*ch), GFP_KERNEL);
	if (!ch)
		return -ENOMEM;
	ch->ring = vmalloc(TVM_OUT_RING);
	if (!ch->ring) {
		kfree(ch);
		return -ENOMEM;
	}
	kref_init(&ch->ref);		/* the reader's */
	mutex_init(&ch->lock);
	init_waitqueue_head(&ch->rwait);
	init_waitqueue_head(&ch->wwait);
	kref_get(&ch->ref);		/* tvm_current's */
	mutex_lock(&tvm_current_lock);
	old = tvm_current;
	tvm_current = ch;
	mutex_unlock(&tvm_current_lock);
	if (old)
		tvm_chan_put(old);
	file->private_data = ch;
	stream_open(inode, file);
	return 0;
}

static int tvm_reader_release(struct inode *inode, struct file *file)
{
	struct tvm_chan *ch = file->private_data;
	bool was_current = false;

	mutex_lock(&ch->lock);
	ch->reader_gone = true;
	mutex_unlock(&ch->lock);
	wake_up_interruptible_all(&ch->wwait);
	mutex_lock(&tvm_current_lock);
	if (tvm_current == ch) {
		tvm_current = NULL;
		was_current = true;
	}
	mutex_unlock(&tvm_current_lock);
	if (was_current)
		tvm_chan_put(ch);
	tvm_chan_put(ch);
	return 0;
}

static const struct file_operations tvm_reader_fops = {
	.owner = THIS_MODULE,
	.open = tvm_reader_open,
	.release = tvm_reader_release,
	.read = tvm_reader_read,
	.poll = tvm_reader_poll,
	.unlocked_ioctl = tvm_reader_ioctl,
	.llseek = no_llseek,
};

#define TVM_WRITER_FOPS(name, open_fn)				\
	static const struct file_operations name = {		\
		.owner = THIS_MODULE,				\
		.open = open_fn,				\
		.release = tvm_writer_release,			\
		.read = tvm_writer_read,			\
		.write = tvm_write,				\
		.write_iter = tvm_write_iter,			\
		.splice_write = iter_file_splice_write,		\
		.poll = tvm_writer_poll,			\
		.llseek = no_llseek,				\
	}

TVM_WRITER_FOPS(tvm_stdout_fops, tvm_stdout_open);
TVM_WRITER_FOPS(tvm_stderr_fops, tvm_stderr_open);

static struct miscdevice tvm_devices[] = {
	{ .minor = MISC_DYNAMIC_MINOR, .name = "tvm-output", .fops = &tvm_reader_fops, .mode = 0600 },
	{ .minor = MISC_DYNAMIC_MINOR, .name = "tvm-stdout", .fops = &tvm_stdout_fops, .mode = 0222 },
	{ .minor = MISC_DYNAMIC_MINOR, .name = "tvm-stderr", .fops = &tvm_stderr_fops, .mode = 0222 },
};

static int __init tvm_output_init(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(tvm_devices); i++) {
		err = misc_register(&tvm_devices[i]);
		if (err) {
			while (--i >= 0)
				misc_deregister(&tvm_devices[i]);
			return err;
		}
	}
	return 0;
}
device_initcall(tvm_output_init);
