{{/* Chart name, truncated to a DNS label. */}}
{{- define "retort.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already holds it. */}}
{{- define "retort.fullname" -}}
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

{{- define "retort.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "retort.selectorLabels" -}}
app.kubernetes.io/name: {{ include "retort.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selects the gateway pods only (not the distillation jobs' pods). */}}
{{- define "retort.gatewaySelectorLabels" -}}
{{ include "retort.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "retort.labels" -}}
helm.sh/chart: {{ include "retort.chart" . }}
{{ include "retort.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: retort
{{- end }}

{{- define "retort.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "retort.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods read RETORT_* variables from, or "" when there is none. */}}
{{- define "retort.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if include "retort.secretData" . | trim }}
{{- include "retort.fullname" . }}
{{- end }}
{{- end }}

{{/* Key/value pairs of the chart-managed Secret (empty when nothing is set). The keys are
     RETORT_<SECTION>__<FIELD> variables; the gateway parses each value as YAML (JSON here). */}}
{{- define "retort.secretData" -}}
{{- with .Values.secrets }}
{{- if .databaseUrl }}
RETORT_PROMPTLOG__URL: {{ .databaseUrl | b64enc | quote }}
{{- end }}
{{- if .apiKeys }}
RETORT_AUTH__API_KEYS: {{ .apiKeys | toJson | b64enc | quote }}
{{- end }}
{{- if .redisUrl }}
RETORT_LIMITS__REDIS_URL: {{ .redisUrl | b64enc | quote }}
{{- end }}
{{- range $k, $v := .extra }}
{{ $k }}: {{ $v | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The profile of a distillation job: distill.profile, or the gateway's. */}}
{{- define "retort.distillProfile" -}}
{{- default .Values.profile .Values.distill.profile }}
{{- end }}

{{/* Image reference; the gpu profile (or an explicit "gpu" argument) picks the CUDA tag. */}}
{{- define "retort.image" -}}
{{- $root := index . 0 }}
{{- $profile := index . 1 }}
{{- $img := $root.Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- $tag := $img.tag }}
{{- if not $tag }}
{{- $tag = $root.Chart.AppVersion }}
{{- if eq $profile "gpu" }}
{{- $tag = printf "%s%s" $tag $img.gpuTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/* Drain seconds from the rendered config. */}}
{{- define "retort.drainSeconds" -}}
{{- $shutdown := .Values.config.shutdown | default dict }}
{{- int (default 30 $shutdown.drain_seconds) }}
{{- end }}

{{/* Pod grace period: explicit (checked) or preStop sleep + drain + 15 s. */}}
{{- define "retort.terminationGracePeriodSeconds" -}}
{{- $floor := add (int .Values.preStopSleepSeconds) (int (include "retort.drainSeconds" .)) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $floor 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $floor) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.shutdown.drain_seconds (%d)" (int .Values.terminationGracePeriodSeconds) (int $floor)) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Container resources for a profile; adds the GPU limit in the gpu profile.
     Arguments: (list resourcesByProfile profile gpuResourceName gpuCount). */}}
{{- define "retort.resources" -}}
{{- $byProfile := index . 0 }}
{{- $profile := index . 1 }}
{{- $gpuName := index . 2 }}
{{- $gpuCount := index . 3 }}
{{- $res := deepCopy (default (index $byProfile $profile) $byProfile.override) }}
{{- if eq $profile "gpu" }}
{{- $limits := deepCopy ($res.limits | default dict) }}
{{- $_ := set $limits $gpuName (int $gpuCount) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Environment shared by the gateway and the distillation jobs. */}}
{{- define "retort.env" -}}
- name: RETORT_HOME
  value: /var/lib/retort
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /var/lib/retort/hf
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONUNBUFFERED
  value: "1"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "retort.envFrom" -}}
{{- $secret := include "retort.secretName" . }}
{{- if $secret }}
- secretRef:
    name: {{ $secret }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "retort.volumeMounts" -}}
- name: config
  mountPath: /etc/retort
  readOnly: true
- name: state
  mountPath: /var/lib/retort
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "retort.volumes" -}}
- name: config
  configMap:
    name: {{ include "retort.fullname" . }}
- name: state
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (include "retort.fullname" .) }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSize }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* nodeSelector and tolerations, with the GPU ones added in the gpu profile. */}}
{{- define "retort.scheduling" -}}
{{- $root := index . 0 }}
{{- $profile := index . 1 }}
{{- $nodeSelector := deepCopy ($root.Values.nodeSelector | default dict) }}
{{- $tolerations := $root.Values.tolerations | default list }}
{{- if eq $profile "gpu" }}
{{- $nodeSelector = merge $nodeSelector ($root.Values.gpu.nodeSelector | default dict) }}
{{- $tolerations = concat $tolerations ($root.Values.gpu.tolerations | default list) }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* retort.yaml: server/model/engine always, other sections only when set. */}}
{{- define "retort.config" -}}
{{- $cfg := dict }}
{{- range $section, $body := .Values.config }}
{{- if $body }}
{{- $_ := set $cfg $section (deepCopy $body) }}
{{- end }}
{{- end }}
{{- $server := merge (dict "host" "0.0.0.0" "port" (int .Values.containerPort)) ($cfg.server | default dict) }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- $_ := set $server "port" (int .Values.containerPort) }}
{{- $_ := set $cfg "server" $server }}
{{- $model := $cfg.model | default dict }}
{{- if not $model.served_name }}
{{- $_ := unset $model "served_name" }}
{{- end }}
{{- $_ := set $cfg "model" $model }}
{{- $_ := set $cfg "engine" ($cfg.engine | default dict) }}
{{- toYaml $cfg }}
{{- end }}

{{/* Checks that span several values; each failure names the value to fix. */}}
{{- define "retort.validate" -}}
{{- $engine := .Values.config.engine | default dict }}
{{- $parallel := mul (int (default 1 $engine.tensor_parallel_size)) (int (default 1 $engine.pipeline_parallel_size)) }}
{{- if and (eq .Values.profile "gpu") (lt (int .Values.gpu.count) (int $parallel)) }}
{{- fail (printf "gpu.count (%d) must be at least engine.tensor_parallel_size x pipeline_parallel_size (%d)" (int .Values.gpu.count) (int $parallel)) }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set either maxUnavailable or minAvailable, not both" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetInflightRequests) (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.extraMetrics) }}
{{- fail "autoscaling.enabled needs targetInflightRequests, targetCPUUtilizationPercentage or extraMetrics" }}
{{- end }}
{{- if and .Values.secrets.existingSecret (include "retort.secretData" . | trim) }}
{{- fail "secrets.existingSecret is set: put the database URL, keys and Redis URL in that Secret and leave secrets.databaseUrl/apiKeys/redisUrl/extra empty" }}
{{- end }}
{{- $keyIds := dict }}
{{- range .Values.secrets.apiKeys }}
{{- if hasKey $keyIds .id }}
{{- fail (printf "secrets.apiKeys: id %q is used twice" .id) }}
{{- end }}
{{- $_ := set $keyIds .id true }}
{{- end }}
{{- if and .Values.distill.enabled (not .Values.distill.jobs) }}
{{- fail "distill.enabled needs at least one entry in distill.jobs ({name, adapter})" }}
{{- end }}
{{- end }}

{{/* distill.yaml for `retort distill run --config`: distill.config, pointed at retort.yaml. */}}
{{- define "retort.distillConfig" -}}
{{- $cfg := deepCopy (.Values.distill.config | default dict) }}
{{- $_ := set $cfg "settings" "/etc/retort/retort.yaml" }}
{{- toYaml $cfg }}
{{- end }}
