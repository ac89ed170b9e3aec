//! Starting Firecracker VMs from templates (Firecracker snapshots, see
//! [`crate::template::firecracker`]), with the same policy as QEMU's
//! templates: a missing template is built inline (CLI) or in the background
//! (server); a corrupt one is removed; a failed build or restore is noted,
//! so starts cold boot without retrying it for
//! [`crate::template::RETRY_AFTER_FAILURE`]. None of it is the caller's
//! error: the VM cold boots and [`crate::StartedVm::note`] says why (never
//! worse than a cold boot). A VMM whose API refuses to snapshot (the
//! stand-in: its QEMU cannot migrate `vhost-user-vsock-device`) is a failed
//! build like any other.

use tracing::{info_span, warn, Instrument};
use tvm_config::Runtime;

use crate::backend::firecracker::Firecracker;
use crate::template::firecracker::{self as fc_template, FcBuildRequest};
use crate::template::{Template, TemplateError};
use crate::{error_chain, image, spec, ExecuteError, Progress, Pyrovm, TemplateBuilds, Vm};

impl Pyrovm {
    /// Restores a Firecracker VM from the template for (`runtime`, `image`,
    /// `spec`), or says why not (see the module docs).
    pub(crate) async fn restore_firecracker(
        &self,
        fc: &Firecracker,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> Result<Vm, String> {
        let inputs = self.fc_template_inputs(fc, runtime, image, spec);
        let key = inputs.key();
        let template = match self.templates.find(&key) {
            Ok(t) => t,
            Err(TemplateError::Missing(_)) if self.template_builds == TemplateBuilds::Inline => {
                if let Some(why) = self.templates.recent_failure(&key) {
                    return Err(format!("template build failed recently: {why}"));
                }
                let req = self.fc_build_request(fc, runtime, inputs.clone(), spec);
                match self.templates.build_firecracker(req).await {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template build failed; cold boot");
                        return Err(format!("template build failed: {}", error_chain(&e)));
                    }
                }
            }
            Err(e) => {
                if matches!(e, TemplateError::Corrupt { .. }) {
                    warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template unusable; removed, cold boot");
                    let _ = self.templates.remove(&key);
                }
                if self.template_builds == TemplateBuilds::Background {
                    self.rebuild_firecracker_in_background(fc, runtime, inputs, spec);
                }
                return Err(error_chain(&e));
            }
        };
        let (restoring, extras) = match fc_template::restore_launch(&self.templates, &template, fc) {
            Ok(l) => l,
            Err(e) => {
                warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template vanished or changed; cold boot");
                if matches!(e, TemplateError::Corrupt { .. }) {
                    let _ = self.templates.remove(&key);
                }
                return Err(error_chain(&e));
            }
        };
        let id = crate::new_vm_id();
        let restored = Vm::launch(&id, &self.vmm_host(), &restoring, spec, self.boot_timeout(), extras).await;
        restored.map_err(|e| {
            let e = TemplateError::Vm(e);
            self.templates.count_restore_failure();
            warn!(runtime = %runtime.id, key, error = %error_chain(&e), "restore from template failed; removed, cold boot");
            let _ = self.templates.remove(&key);
            self.templates.note_failure(&key, &format!("restore failed: {}", error_chain(&e)));
            if self.template_builds == TemplateBuilds::Background {
                self.rebuild_firecracker_in_background(fc, runtime, inputs, spec);
            }
            format!("restore failed: {}", error_chain(&e))
        })
    }

    /// Builds the Firecracker template for `runtime` at `memory_mib` unless it exists.
    ///
    /// # Errors
    /// The image or the template could not be built.
    pub(crate) async fn ensure_template_firecracker(
        &self,
        fc: &Firecracker,
        runtime: &Runtime,
        memory_mib: u64,
    ) -> Result<Template, ExecuteError> {
        let image = self.ensure_image(runtime, Progress::hidden()).await?;
        let spec = self.vm_spec(&image, memory_mib);
        let inputs = self.fc_template_inputs(fc, runtime, &image, &spec);
        let req = self.fc_build_request(fc, runtime, inputs, &spec);
        self.templates
            .build_firecracker(req)
            .await
            .map_err(|source| ExecuteError::Template { runtime: runtime.id.clone(), source })
    }

    fn fc_template_inputs(
        &self,
        fc: &Firecracker,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> crate::template::TemplateInputs {
        fc_template::inputs(fc, spec, &self.kernel.key, &image.key, crate::warmup_command(runtime))
    }

    fn fc_build_request(
        &self,
        fc: &Firecracker,
        runtime: &Runtime,
        inputs: crate::template::TemplateInputs,
        spec: &spec::VmSpec,
    ) -> FcBuildRequest<'_> {
        FcBuildRequest {
            runtime: runtime.id.clone(),
            inputs,
            spec: spec.clone(),
            host: self.vmm_host(),
            fc: fc.clone(),
            boot_timeout: self.boot_timeout(),
        }
    }

    /// Starts one background build of the template (none if one runs
    /// already or one failed recently).
    fn rebuild_firecracker_in_background(
        &self,
        fc: &Firecracker,
        runtime: &Runtime,
        inputs: crate::template::TemplateInputs,
        spec: &spec::VmSpec,
    ) {
        let key = inputs.key();
        if self.templates.recent_failure(&key).is_some() || !self.templates.claim_build(&key) {
            return;
        }
        let this = self.clone();
        let (runtime, spec, fc) = (runtime.clone(), spec.clone(), fc.clone());
        let span = info_span!("template", key = %key, runtime = %runtime.id, vmm = "firecracker");
        tokio::spawn(
            async move {
                let req = this.fc_build_request(&fc, &runtime, inputs, &spec);
                if let Err(e) = this.templates.build_firecracker(req).await {
                    warn!(error = %error_chain(&e), "background template build failed");
                }
                this.templates.release_build(&key);
            }
            .instrument(span),
        );
    }
}
