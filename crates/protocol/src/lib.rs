//! The host↔guest protocol of TVM.
//!
//! One job per VM: the guest agent announces [`GuestMessage::Ready`], the host
//! sends one [`HostMessage::Run`], the agent streams the program's output as
//! [`GuestMessage::OutputRecords`] and ends with [`GuestMessage::Done`].
//! Frames are a 4-byte big-endian length followed by that many bytes of JSON,
//! except `OutputRecords`, whose frame is binary (the length's bit 31 set;
//! see `codec`). Every reader is given a maximum
//! frame size: the guest runs untrusted code, so the host must never let the
//! guest choose how much memory it allocates.
//!
//! Templates add two host messages: [`HostMessage::Prewarm`] while a template
//! is built (answered by [`GuestMessage::Warmed`]), and
//! [`HostMessage::Resume`] right after a VM is restored from one (answered by
//! a second `Ready`).

mod codec;
mod messages;
mod signal;

pub use codec::{encode, read_frame, write_frame, FrameDecoder, FrameError, Message, RAW_BIT};
#[cfg(feature = "tokio")]
pub use codec::{read_frame_async, write_frame_async};
pub use messages::*;
pub use signal::linux_signal_name;

/// Bumped whenever a message changes shape; host and agent must agree.
/// 2: `Prewarm`, `Resume`, `Warmed` and the job's `uniqueness` (templates);
/// a host must never restore clones through an agent that ignores them.
/// 3: interactive jobs (`Job::interactive`, `Stdin`, `StdinEof`, `Signal`,
/// `StageStarted`, `StageExited`); an older agent would leave a session's
/// program waiting for input forever.
/// 4: output travels as binary frames (`codec`), not JSON.
/// 5: all output is [`GuestMessage::OutputRecords`]; the single-stream
/// `Output` message is gone (an older host would drop a spawn failure's message).
/// 6: a streamed stage's result does not repeat its output
/// ([`StageResult::streamed`]); an older host would report it empty.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest frame the host accepts from the guest. Output arrives in chunks of
/// at most [`OUTPUT_CHUNK`] bytes, so anything larger is hostile.
pub const MAX_GUEST_FRAME: usize = 1 << 20;

/// Largest frame the agent accepts from the host (the job with its files).
pub const MAX_HOST_FRAME: usize = 64 << 20;

/// Largest raw output chunk the agent streams. The agent batches a program's
/// writes into chunks up to this size, so relaying costs per byte rather than
/// per write; a chunk's (binary) frame stays well under [`MAX_GUEST_FRAME`].
pub const OUTPUT_CHUNK: usize = 64 << 10;

/// Name of the virtio-serial port the agent talks on (QEMU backend).
pub const VIRTIO_PORT_NAME: &str = "tvm.agent";

/// vsock port the agent listens on (Firecracker backend).
pub const VSOCK_PORT: u32 = 1024;
