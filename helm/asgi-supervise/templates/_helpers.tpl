{{- define "asgi-supervise.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asgi-supervise.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asgi-supervise.labels" -}}
app.kubernetes.io/name: {{ include "asgi-supervise.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
