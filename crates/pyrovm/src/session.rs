//! Interactive jobs (protocol 3): the host feeds the run stage's stdin and
//! signals while the job runs, and sees each stage start and end as it
//! happens. A child module of `vm`, as it drives the VM's channel.

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::Receiver;
use tracing::{info_span, Instrument};
use tvm_protocol::{
    write_frame_async, FrameError, GuestMessage, HostMessage, Job, JobResult, Stage, StageStatus, Stream, STDIN_CHUNK,
};

use super::{each_record, send_job, vm_gone, RunJobError, SentJob, StreamedOutput, Vm};

/// Input for a running interactive job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionInput {
    /// Bytes for the run stage's stdin (split into protocol-sized chunks).
    Stdin(Vec<u8>),
    /// Close the run stage's stdin once everything before is written.
    Eof,
    /// Deliver this signal (1 to 31) to every process of the running stage.
    Signal(i32),
}

/// What an interactive job reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent<'a> {
    /// A stage is starting.
    StageStarted(Stage),
    /// Output of a stage, as it was produced.
    Output {
        /// Which stage.
        stage: Stage,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        data: &'a [u8],
    },
    /// A stage ended (its full result comes with the job's result).
    StageExited {
        /// Which stage.
        stage: Stage,
        /// How it ended.
        status: StageStatus,
        /// Exit code, when it exited.
        exit_code: Option<i32>,
        /// Signal number, when one ended it.
        signal: Option<i32>,
    },
}

impl Vm {
    /// Runs `job` as an interactive session: `inputs` are forwarded to the
    /// agent as they come (a closed channel just means no more input),
    /// `on_event` sees stage starts, output and stage exits as they happen.
    /// Destroys the VM; dropping the future kills it too. The host's
    /// deadline and output cap are those of [`Vm::execute`], so a session
    /// lasts at most twice its stages' wall limits plus 15 s, whatever the
    /// guest does.
    ///
    /// # Errors
    /// [`RunJobError`], as for [`Vm::execute`].
    pub async fn execute_interactive(
        mut self,
        job: &Job,
        inputs: &mut Receiver<SessionInput>,
        mut on_event: impl FnMut(SessionEvent<'_>),
    ) -> Result<JobResult, RunJobError> {
        let span = info_span!("vm", vm = %self.id);
        async move {
            let (mut rd, mut wr) = self.stream.split();
            let SentJob { deadline, deadline_ms, cap, mut decoder } = send_job(&mut wr, job, true).await?;
            let mut buf = vec![0u8; 64 << 10];
            let mut received: u64 = 0;
            let mut streamed = StreamedOutput::new(job);
            let mut open = true;
            loop {
                while let Some(msg) = decoder.next_frame::<GuestMessage>().map_err(RunJobError::Protocol)? {
                    match msg {
                        GuestMessage::OutputRecords { stage, records } => {
                            each_record(&records, &mut received, cap, |stream, data| {
                                streamed.push(stage, stream, data);
                                on_event(SessionEvent::Output { stage, stream, data })
                            })?
                        }
                        GuestMessage::StageStarted { stage } => on_event(SessionEvent::StageStarted(stage)),
                        GuestMessage::StageExited { stage, status, exit_code, signal } => {
                            on_event(SessionEvent::StageExited { stage, status, exit_code, signal })
                        }
                        GuestMessage::Done(mut result) => {
                            streamed.fill(&mut result);
                            return Ok(result);
                        }
                        GuestMessage::Failed { message } => return Err(RunJobError::AgentFailed(message)),
                        // Sessions never carry tests (pyroshell refuses them).
                        GuestMessage::TestDone { .. } => {
                            return Err(RunJobError::Protocol(FrameError::Io(std::io::Error::other(
                                "a test result during an interactive job",
                            ))))
                        }
                        GuestMessage::Ready { .. } | GuestMessage::Warmed { .. } => {
                            return Err(RunJobError::Protocol(FrameError::Io(std::io::Error::other(
                                "unexpected second ready (or warm-up report) during a job",
                            ))))
                        }
                    }
                }
                tokio::select! {
                    read = tokio::time::timeout_at(deadline, rd.read(&mut buf)) => match read {
                        Err(_) => return Err(RunJobError::Deadline { ms: deadline_ms }),
                        Ok(Err(e)) => return Err(RunJobError::Protocol(FrameError::Io(e))),
                        // The VM went away: say why below.
                        Ok(Ok(0)) => break,
                        Ok(Ok(n)) => decoder.push(&buf[..n]),
                    },
                    input = inputs.recv(), if open => match input {
                        None => open = false,
                        Some(SessionInput::Stdin(data)) => {
                            for chunk in data.chunks(STDIN_CHUNK) {
                                let msg = HostMessage::Stdin { data: chunk.to_vec() };
                                write_frame_async(&mut wr, &msg).await.map_err(RunJobError::Send)?;
                            }
                        }
                        Some(SessionInput::Eof) => {
                            write_frame_async(&mut wr, &HostMessage::StdinEof).await.map_err(RunJobError::Send)?;
                        }
                        Some(SessionInput::Signal(signal)) => {
                            let msg = HostMessage::Signal { signal };
                            write_frame_async(&mut wr, &msg).await.map_err(RunJobError::Send)?;
                        }
                    },
                }
            }
            Err(vm_gone(&self.console).await)
        }
        .instrument(span)
        .await
    }
}
