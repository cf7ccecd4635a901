{{/* The chart's name, cut to fit Kubernetes names. */}}
{{- define "dak.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix for every object: <release>-dak, or <release> when it already says dak. */}}
{{- define "dak.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dak.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dak.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one service; call with (dict "root" $ "service" "session"). */}}
{{- define "dak.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dak.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{/* The Secret holding jwt-secret and internal-token. */}}
{{- define "dak.secretName" -}}
{{- default (printf "%s-auth" (include "dak.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The services with a public HTTP part (served behind the reverse proxy). */}}
{{- define "dak.public" -}}
ws-gateway rest-gateway persistence group-router
{{- end -}}
