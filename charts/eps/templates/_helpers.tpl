{{/* Common labels for every object of the release. */}}
{{- define "eps.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The artifact store root every run writes under: s3://<bucket>[/<prefix>]. */}}
{{- define "eps.storeRoot" -}}
{{- $bucket := required "store.bucket is required" .Values.store.bucket -}}
{{- if .Values.store.prefix -}}
{{- printf "s3://%s/%s" $bucket (trimAll "/" .Values.store.prefix) -}}
{{- else -}}
{{- printf "s3://%s" $bucket -}}
{{- end -}}
{{- end -}}

{{/* The cache claim the pods mount, if any. */}}
{{- define "eps.cacheClaim" -}}
{{- if .Values.cache.claimName -}}
{{- .Values.cache.claimName -}}
{{- else if .Values.cache.create -}}
eps-cache
{{- end -}}
{{- end -}}
