//! The agent's side of firmware updates: offers, the resumable download's requests and
//! chunks, the install program, and reporting outcomes (the files are `crate::update`'s).

use super::*;

impl Agent {
    /// An offer: refused without an install program; otherwise the download starts or
    /// resumes (or a finished update's outcome is reported again). An empty offer only
    /// says the hub takes firmware messages.
    pub(super) fn on_firmware_offer(&mut self, offer: &schemas::FirmwareOffer) {
        if offer.version.is_empty() || self.installing.is_some() {
            return;
        }
        let Some(download) = self.download.as_mut() else {
            return;
        };
        if self.config.update.program().is_none() {
            self.session.report_firmware(
                &offer.version,
                UpdateState::Failed,
                0,
                "refused: no [update] program is configured on this agent",
            );
            return;
        }
        let step = blocking(|| download.offer(offer));
        // Every connection hears where the download stands.
        self.reported_percent = None;
        self.firmware_step(&offer.version, step);
    }

    /// Reports what an offer or a chunk led to, asks for more, or starts the install.
    pub(super) fn firmware_step(
        &mut self,
        version: &str,
        step: Result<crate::update::Step, crate::update::UpdateError>,
    ) {
        use crate::update::Step;
        match step {
            Ok(Step::Ignored) => {}
            Ok(Step::Downloading(percent)) => {
                if self.reported_percent != Some(percent) {
                    self.reported_percent = Some(percent);
                    self.session
                        .report_firmware(version, UpdateState::Downloading, percent, "");
                }
            }
            Ok(Step::Refused(why)) => {
                tracing::warn!(version, "firmware refused: {why}");
                self.session
                    .report_firmware(version, UpdateState::Failed, 100, &why);
            }
            Ok(Step::Done(outcome)) => self.report_outcome(version, &outcome),
            Ok(Step::Verified(path)) => self.install(version, path),
            Err(e) => {
                tracing::error!(version, "firmware download failed: {e}");
                self.session
                    .report_firmware(version, UpdateState::Failed, 0, &e.to_string());
            }
        }
        self.request_chunks();
    }

    /// Asks for chunks while the download's window has room.
    fn request_chunks(&mut self) {
        let Some(download) = self.download.as_mut() else {
            return;
        };
        while let Some((version, offset, len)) = download.next_request() {
            if !self.session.request_firmware(&version, offset, len) {
                download.request_not_sent(offset);
                break;
            }
        }
    }

    /// Runs `[update] program FILE` in a task; its outcome comes back as
    /// [`Event::Installed`].
    fn install(&mut self, version: &str, path: std::path::PathBuf) {
        let Some(program) = self.config.update.program().map(Path::to_path_buf) else {
            return;
        };
        tracing::info!(version, program = %program.display(), "installing firmware");
        self.session
            .report_firmware(version, UpdateState::Installing, 100, "");
        self.installing = Some(version.to_string());
        let timeout = self.config.update.timeout;
        let tx = self.install_done.clone();
        self.running.spawn(async move {
            let args = [path.display().to_string()];
            let spec = crate::process::Spec {
                program: &program,
                args: &args,
                env: &[],
                cwd: None,
                timeout,
                max_output: schemas::limits::MAX_ERROR_TEXT_LEN,
            };
            let outcome = match crate::process::run(&spec).await {
                Ok(out) => {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
                    let output = [text(&out.stdout), text(&out.stderr)]
                        .into_iter()
                        .filter(|t| !t.is_empty())
                        .collect::<Vec<_>>()
                        .join("\n");
                    if out.exit.success() {
                        crate::update::Outcome {
                            succeeded: true,
                            reason: output,
                        }
                    } else {
                        crate::update::Outcome {
                            succeeded: false,
                            reason: format!("install program: exit {}: {output}", out.exit.code()),
                        }
                    }
                }
                Err(err) => crate::update::Outcome {
                    succeeded: false,
                    reason: format!("install program: {err}"),
                },
            };
            let _ = tx.send(outcome).await;
        });
    }

    /// The install program ended: record and report it.
    pub(super) fn installed(&mut self, outcome: crate::update::Outcome) {
        let Some(version) = self.installing.take() else {
            return;
        };
        tracing::info!(
            version,
            succeeded = outcome.succeeded,
            "firmware install ended: {}",
            outcome.reason
        );
        if let Some(download) = self.download.as_mut() {
            if let Err(e) = blocking(|| download.finish(outcome.clone())) {
                tracing::error!("recording the install's outcome failed: {e}");
            }
        }
        self.report_outcome(&version, &outcome);
    }

    fn report_outcome(&mut self, version: &str, outcome: &crate::update::Outcome) {
        let state = if outcome.succeeded {
            UpdateState::Succeeded
        } else {
            UpdateState::Failed
        };
        self.session
            .report_firmware(version, state, 100, &outcome.reason);
    }
}
