{{/* Names and labels. */}}
{{- define "tvm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tvm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tvm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tvm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tvm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tvm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tvm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tvm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tvm.secretName" -}}
{{- default (printf "%s-api-keys" (include "tvm.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "tvm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The longest one request may take end to end (seconds): waiting in the queue, compiling, running,
plus slack for the boot and the result. The mesh's route timeout and per-try timeout are this, so
the mesh never gives up on a request the server would still answer.
*/}}
{{- define "tvm.requestTimeoutSeconds" -}}
{{- add .Values.serve.queueTimeoutSeconds .Values.limits.maxCompileWallSeconds .Values.limits.maxRunWallSeconds .Values.limits.slackSeconds }}
{{- end }}

{{/* Memory of one pod (MiB): guest RAM budget + per-VM QEMU overhead + the server. */}}
{{- define "tvm.memoryMiB" -}}
{{- add .Values.capacity.guestRamBudgetMiB (mul .Values.capacity.maxVms .Values.capacity.vmmOverheadMiB) .Values.capacity.serverMiB }}
{{- end }}

{{- define "tvm.memory" -}}
{{- default (printf "%sMi" (include "tvm.memoryMiB" .)) .Values.capacity.memory }}
{{- end }}

{{/* CPU of one pod: half a core per VM vCPU (VMs mostly wait on I/O and the guest), at least 1. */}}
{{- define "tvm.cpu" -}}
{{- if .Values.capacity.cpuRequest }}
{{- .Values.capacity.cpuRequest }}
{{- else }}
{{- printf "%dm" (max 1000 (div (mul .Values.capacity.maxVms .Values.capacity.vcpus 1000) 2)) }}
{{- end }}
{{- end }}

{{/*
The pod's grace period: preStop sleep + drain grace + 15 s for connections to close and the
pool's VMs to be destroyed. Longer than the drain grace, so SIGKILL never cuts a drain short.
*/}}
{{- define "tvm.terminationGraceSeconds" -}}
{{- add .Values.preStopSleepSeconds .Values.serve.drainGraceSeconds 15 }}
{{- end }}

{{/* Istio duration strings ("300s"). */}}
{{- define "tvm.seconds" -}}
{{- printf "%ds" (int .) }}
{{- end }}
