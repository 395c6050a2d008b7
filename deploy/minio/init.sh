#!/bin/sh
# One-shot: create llorch's model bucket and an S3 user that may use only that
# bucket, so apiserver and workers never hold MinIO's root credentials.
# Idempotent: safe on every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${LLORCH_S3_ACCESS_KEY:?}" "${LLORCH_S3_SECRET_KEY:?}"
bucket="${LLORCH_S3_BUCKET:-llorch-models}"
policy="llorch-models-rw"

tries=0
until mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; do
	tries=$((tries + 1))
	if [ "$tries" -ge 60 ]; then
		echo "MinIO not reachable at http://minio:9000 after 60 s" >&2
		exit 1
	fi
	sleep 1
done

mc mb --ignore-existing "local/$bucket"
mc anonymous set none "local/$bucket"

# Read, write, list and multipart on this bucket only.
printf '%s\n' '{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::'"$bucket"'"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::'"$bucket"'/*"]}
  ]
}' > /tmp/llorch-policy.json
mc admin policy create local "$policy" /tmp/llorch-policy.json

if [ "$LLORCH_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
	echo "LLORCH_S3_ACCESS_KEY is the MinIO root user: no separate llorch user created"
	exit 0
fi
mc admin user add local "$LLORCH_S3_ACCESS_KEY" "$LLORCH_S3_SECRET_KEY"
if ! mc admin policy attach local "$policy" --user "$LLORCH_S3_ACCESS_KEY"; then
	# A re-run finds the policy attached already; anything else is an error.
	# (Matched by the shell: the mc image may have no grep.)
	info="$(mc admin user info local "$LLORCH_S3_ACCESS_KEY" --json)"
	case "$info" in
	*"\"$policy\""*) echo "policy $policy was attached already" ;;
	*) echo "cannot attach policy $policy to $LLORCH_S3_ACCESS_KEY" >&2; exit 1 ;;
	esac
fi
echo "bucket $bucket ready; user $LLORCH_S3_ACCESS_KEY has policy $policy"
