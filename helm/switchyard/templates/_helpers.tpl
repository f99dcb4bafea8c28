{{/* Names and labels. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.fullname" -}}
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

{{/* The admin Service's name: the fullname with "-admin", kept within 63 characters. */}}
{{- define "switchyard.adminServiceName" -}}
{{- printf "%s-admin" (include "switchyard.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "switchyard.image" -}}
{{- $repo := required "image.repository is required: there is no public image. Build and push one from the repository root (docker build -t REGISTRY/switchyard:0.1.0 . && docker push REGISTRY/switchyard:0.1.0), then set image.repository=REGISTRY/switchyard" .Values.image.repository }}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The pod's service account: the chart's own, a named existing one, or the namespace's default. */}}
{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default .Values.serviceAccountName | default (include "switchyard.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default .Values.serviceAccountName | default "default" }}
{{- end }}
{{- end }}

{{/* "true" when a config change must roll the pods (see rollOnConfigChange in values.yaml). */}}
{{- define "switchyard.rollOnConfigChange" -}}
{{- $roll := toString .Values.rollOnConfigChange }}
{{- if or (eq $roll "true") (and (eq $roll "auto") (eq .Values.state.type "postgres")) }}true{{ end }}
{{- end }}

{{/* Environment shared by the pods and the sync install Job. */}}
{{- define "switchyard.env" -}}
- name: SWITCHYARD_ADMIN_URL
  value: "http://127.0.0.1:{{ int .Values.ports.admin }}"
{{- if .Values.adminToken.enabled }}
- name: SWITCHYARD_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "switchyard.adminTokenSecretName" . }}
      key: {{ include "switchyard.adminTokenSecretKey" . }}
{{- end }}
{{- if eq .Values.state.type "postgres" }}
- name: SWITCHYARD_STATE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "switchyard.stateSecretName" . }}
      key: {{ include "switchyard.stateSecretKey" . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Mounts of the files the config names, shared by the pods and the sync install Job. */}}
{{- define "switchyard.fileMounts" -}}
{{- if .Values.adminTokensFile.existingSecret }}
- name: admin-tokens
  mountPath: /etc/switchyard-tokens
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/switchyard-tls
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The volumes behind switchyard.fileMounts. */}}
{{- define "switchyard.fileVolumes" -}}
{{- if .Values.adminTokensFile.existingSecret }}
- name: admin-tokens
  secret:
    secretName: {{ .Values.adminTokensFile.existingSecret }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secrets: the chart's own, or the user's existing ones. */}}
{{- define "switchyard.adminTokenSecretName" -}}
{{- if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecret }}
{{- else }}
{{- printf "%s-admin-token" (include "switchyard.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "switchyard.adminTokenSecretKey" -}}
{{- if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecretKey }}
{{- else -}}
token
{{- end }}
{{- end }}

{{- define "switchyard.stateSecretName" -}}
{{- if .Values.state.postgres.existingSecret }}
{{- .Values.state.postgres.existingSecret }}
{{- else }}
{{- printf "%s-state" (include "switchyard.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "switchyard.stateSecretKey" -}}
{{- if .Values.state.postgres.existingSecret }}
{{- .Values.state.postgres.existingSecretKey }}
{{- else -}}
url
{{- end }}
{{- end }}

{{/*
Timing of a pod's end: preStop sleep, then SIGTERM -> drain_delay -> shutdown_timeout.
terminationGracePeriodSeconds covers all three plus a margin.
*/}}
{{- define "switchyard.preStopSeconds" -}}
{{- if eq .Values.preStop.mode "none" }}0{{ else }}{{ int .Values.preStop.sleepSeconds }}{{ end }}
{{- end }}

{{- define "switchyard.terminationGracePeriodSeconds" -}}
{{- add (include "switchyard.preStopSeconds" . | int) (int .Values.drainDelaySeconds) (int .Values.shutdownTimeoutSeconds) (int .Values.terminationGraceExtraSeconds) }}
{{- end }}

{{/*
The switchyard config file. The chart owns the keys that depend on the pod (addresses, state
store, drain timing); everything else comes from .Values.config.
*/}}
{{- define "switchyard.config" -}}
listen:
  http: "0.0.0.0:{{ int .Values.ports.http }}"
  {{- if .Values.tls.enabled }}
  https:
    addr: "0.0.0.0:{{ int .Values.ports.https }}"
    cert: /etc/switchyard-tls/tls.crt
    key: /etc/switchyard-tls/tls.key
  {{- end }}
admin:
  listen: "0.0.0.0:{{ int .Values.ports.admin }}"
  {{- if .Values.adminTokensFile.existingSecret }}
  tokens_file: /etc/switchyard-tokens/{{ .Values.adminTokensFile.key }}
  {{- end }}
state:
  {{- if eq .Values.state.type "postgres" }}
  url: "${SWITCHYARD_STATE_URL}"
  {{- else }}
  url: "sqlite:///var/lib/switchyard/state.db"
  {{- end }}
drain_delay: {{ int .Values.drainDelaySeconds }}s
shutdown_timeout: {{ int .Values.shutdownTimeoutSeconds }}s
{{- /* The usual keys in the usual order (a map has none), then whatever else is given. */}}
{{- $order := list "timeouts" "limits" "backends" "default_backend" "routes" "flags" "sync" "consistency" }}
{{- range $key := $order }}
{{- if hasKey $.Values.config $key }}
{{ dict $key (index $.Values.config $key) | toYaml }}
{{- end }}
{{- end }}
{{- with omit .Values.config "timeouts" "limits" "backends" "default_backend" "routes" "flags" "sync" "consistency" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Refuse values that cannot work, with a message that says what to change. */}}
{{- define "switchyard.validate" -}}
{{- $type := .Values.state.type }}
{{- if not (has $type (list "sqlite" "postgres")) }}
{{- fail (printf "state.type must be sqlite or postgres, not %q" $type) }}
{{- end }}
{{- if eq $type "sqlite" }}
{{- if and (not .Values.autoscaling.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but state.type is sqlite: replicas cannot share a SQLite file; set state.type=postgres (with state.postgres.url or state.postgres.existingSecret) or replicaCount=1" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}
{{- fail (printf "autoscaling.maxReplicas is %d but state.type is sqlite: replicas cannot share a SQLite file; set state.type=postgres (with state.postgres.url or state.postgres.existingSecret) or disable autoscaling" (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (eq $type "postgres") (not .Values.state.postgres.url) (not .Values.state.postgres.existingSecret) }}
{{- fail "state.type is postgres: set state.postgres.existingSecret (a Secret holding the URL) or state.postgres.url" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (not .Values.adminToken.enabled) (not .Values.adminTokensFile.existingSecret) }}
{{- fail "the admin listener is on 0.0.0.0 and needs a token: keep adminToken.enabled or set adminTokensFile.existingSecret" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if not (has (toString .Values.rollOnConfigChange) (list "true" "false" "auto")) }}
{{- fail (printf "rollOnConfigChange must be true, false or auto, not %q" (toString .Values.rollOnConfigChange)) }}
{{- end }}
{{- if not (has .Values.preStop.mode (list "exec" "sleepAction" "none")) }}
{{- fail (printf "preStop.mode must be exec, sleepAction or none, not %q" .Values.preStop.mode) }}
{{- end }}
{{- range $key := list "listen" "admin" "state" "drain_delay" "shutdown_timeout" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart; use the chart's values instead (ports, adminTokensFile, state, tls, drainDelaySeconds, shutdownTimeoutSeconds)" $key) }}
{{- end }}
{{- end }}
{{- if not .Values.config.backends }}
{{- fail "config.backends is empty: switchyard needs at least one backend" }}
{{- end }}
{{- if not .Values.config.default_backend }}
{{- fail "config.default_backend is not set" }}
{{- end }}
{{- end }}
