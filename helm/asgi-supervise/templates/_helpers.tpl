{{- define "asgi-supervise.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asgi-supervise.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "asgi-supervise.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asgi-supervise.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "asgi-supervise.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "asgi-supervise.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: asgi-supervise
{{- end -}}

{{- define "asgi-supervise.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "asgi-supervise.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "asgi-supervise.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- /*
The replicas the database budget must allow for: the most pods that can run at once.
With the HPA on that is its maxReplicas, not today's count.
*/ -}}
{{- define "asgi-supervise.budgetReplicas" -}}
{{- if .Values.autoscaling.enabled -}}
{{- if lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) -}}
{{- fail (printf "autoscaling.maxReplicas (%v) is below autoscaling.minReplicas (%v)" .Values.autoscaling.maxReplicas .Values.autoscaling.minReplicas) -}}
{{- end -}}
{{- .Values.autoscaling.maxReplicas | int -}}
{{- else -}}
{{- max 1 (.Values.replicaCount | int) -}}
{{- end -}}
{{- end -}}

{{- /*
The drain the pod will really do, as JSON: the profile's numbers (files/profiles.json,
generated from the profiles and the product's constants by helm/generate.py) unless the
values override them.

  minDelay = readiness period x failureThreshold (a draining pod's 503s take that long to
             pull it) + endpoint propagation (kube-proxy, ingress controllers)
  delay    = drain.delaySeconds, or the profile's raised to minDelay
  worst    = delay + graceful timeout + shutdown timeout + the product's fixed overhead
             (cancel wait, abort and kill grace): SIGTERM to exit at worst
  grace    = worst + drain.marginSeconds, rounded up
*/ -}}
{{- define "asgi-supervise.drain" -}}
{{- $generated := .Files.Get "files/profiles.json" | fromJson -}}
{{- $profile := get $generated.profiles .Values.profile -}}
{{- if not $profile -}}
{{- fail (printf "profile: %q is not in files/profiles.json (run helm/generate.py)" .Values.profile) -}}
{{- end -}}
{{- $d := .Values.drain -}}
{{- $r := .Values.probes.readiness -}}
{{- $minDelay := addf (mulf $r.periodSeconds $r.failureThreshold) $d.endpointPropagationSeconds -}}
{{- $delay := maxf $profile.drain_delay $minDelay -}}
{{- if not (kindIs "invalid" $d.delaySeconds) -}}
{{- if lt (float64 $d.delaySeconds) (float64 $minDelay) -}}
{{- fail (printf "drain.delaySeconds (%v) is too short: the readiness probe needs %v s (periodSeconds %v x failureThreshold %v) to see a draining pod and endpoint removal another %v s (drain.endpointPropagationSeconds); set at least %v" $d.delaySeconds $minDelay $r.periodSeconds $r.failureThreshold $d.endpointPropagationSeconds $minDelay) -}}
{{- end -}}
{{- $delay = float64 $d.delaySeconds -}}
{{- end -}}
{{- $graceful := $profile.graceful_timeout -}}
{{- if not (kindIs "invalid" $d.gracefulTimeoutSeconds) -}}
{{- $graceful = float64 $d.gracefulTimeoutSeconds -}}
{{- end -}}
{{- $shutdown := 0.0 -}}
{{- if hasKey $profile "shutdown_timeout" -}}
{{- $shutdown = $profile.shutdown_timeout -}}
{{- end -}}
{{- if hasKey .Values.config "shutdown-timeout" -}}
{{- $configured := index .Values.config "shutdown-timeout" -}}
{{- if not (kindIs "invalid" $configured) -}}
{{- $shutdown = float64 $configured -}}
{{- end -}}
{{- end -}}
{{- $overhead := $generated.drain_overhead_s -}}
{{- $worst := addf $delay $graceful $shutdown $overhead -}}
{{- $needed := ceil (addf $worst $d.marginSeconds) | int -}}
{{- $grace := $needed -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) is too short for this drain: needs at least %v = drain delay %v + graceful timeout %v + shutdown timeout %v + kill overhead %v + margin %v (profile %s); raise it or leave it null to derive it" .Values.terminationGracePeriodSeconds $needed $delay $graceful $shutdown $overhead $d.marginSeconds .Values.profile) -}}
{{- end -}}
{{- $grace = int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- dict "delay" $delay "graceful" $graceful "shutdown" $shutdown "worst" $worst "grace" $grace "needed" $needed "minDelay" $minDelay | toJson -}}
{{- end -}}

{{- /* One `key = value` line of TOML; JSON scalars and arrays of them are valid TOML. */ -}}
{{- define "asgi-supervise.tomlLine" -}}
{{ index . 0 }} = {{ index . 1 | toJson }}
{{- end -}}

{{- /* ASGI_SUPERVISE_* names extraEnv must not set: they would undo what the chart derives. */ -}}
{{- define "asgi-supervise.checkEnv" -}}
{{- $owned := dict "ASGI_SUPERVISE_PORT" "ports.http" "ASGI_SUPERVISE_METRICS_PORT" "ports.metrics" "ASGI_SUPERVISE_HOST" "(the chart)" "ASGI_SUPERVISE_METRICS_HOST" "(the chart)" "ASGI_SUPERVISE_METRICS" "(the chart)" "ASGI_SUPERVISE_UDS" "(the chart)" "ASGI_SUPERVISE_FD" "(the chart)" "ASGI_SUPERVISE_DRAIN_DELAY" "drain.delaySeconds" "ASGI_SUPERVISE_GRACEFUL_TIMEOUT" "drain.gracefulTimeoutSeconds" "ASGI_SUPERVISE_PROFILE" "profile" "ASGI_SUPERVISE_CONFIG" "config" "ASGI_SUPERVISE_REPLICAS" "autoscaling.maxReplicas or replicaCount" -}}
{{- range $i, $e := .Values.extraEnv -}}
{{- if hasKey $owned $e.name -}}
{{- fail (printf "extraEnv[%d].name: %s would override what the chart derives; set %s instead" $i $e.name (get $owned $e.name)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
