#!/bin/sh
# One-shot: create llorch's model bucket and two S3 users limited to it, so
# no llorch process holds MinIO's root credentials:
#   - the control plane's (LLORCH_S3_ACCESS_KEY): read-write, for the
#     apiserver and `llorch models push`, which alone write models and the
#     catalog;
#   - the nodes' (NODE_S3_ACCESS_KEY): read-only on the bucket, writing only
#     under outputs/ (task outputs too large for Temporal's history).
# Idempotent: safe on every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${LLORCH_S3_ACCESS_KEY:?}" "${LLORCH_S3_SECRET_KEY:?}"
: "${NODE_S3_ACCESS_KEY:?}" "${NODE_S3_SECRET_KEY:?}"
bucket="${LLORCH_S3_BUCKET:-llorch-models}"

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

# The control plane: read, write, list and multipart on this bucket only.
cat > /tmp/llorch-models-rw.json <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$bucket"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$bucket/*"]}
  ]
}
POLICY

# The nodes: read models (staging) and list; write only task outputs under
# outputs/. No delete, and nothing under models/ or catalog/: a node that is
# broken into cannot replace a model other nodes load, nor edit the catalog.
# (activities/nodeprivilege_test.go tests this very policy, read out of
# this file: keep the heredoc's markers.)
cat > /tmp/llorch-node.json <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$bucket"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject"],
     "Resource": ["arn:aws:s3:::$bucket/*"]},
    {"Effect": "Allow",
     "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$bucket/outputs/*"]}
  ]
}
POLICY

# user ACCESS SECRET POLICY: create the user (a re-run updates its secret)
# and attach the policy.
user() {
	mc admin policy create local "$3" "/tmp/$3.json"
	mc admin user add local "$1" "$2"
	if ! mc admin policy attach local "$3" --user "$1"; then
		# A re-run finds the policy attached already; anything else is an error.
		# (Matched by the shell: the mc image may have no grep.)
		info="$(mc admin user info local "$1" --json)"
		case "$info" in
		*"\"$3\""*) echo "policy $3 was attached to $1 already" ;;
		*) echo "cannot attach policy $3 to $1" >&2; exit 1 ;;
		esac
	fi
	echo "user $1 has policy $3"
}

if [ "$LLORCH_S3_ACCESS_KEY" = "$NODE_S3_ACCESS_KEY" ]; then
	echo "LLORCH_S3_ACCESS_KEY and NODE_S3_ACCESS_KEY must differ: nodes get a read-only user" >&2
	exit 1
fi
if [ "$NODE_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
	echo "NODE_S3_ACCESS_KEY is the MinIO root user: nodes must get the read-only user" >&2
	exit 1
fi
if [ "$LLORCH_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
	echo "LLORCH_S3_ACCESS_KEY is the MinIO root user: no separate control-plane user created"
else
	user "$LLORCH_S3_ACCESS_KEY" "$LLORCH_S3_SECRET_KEY" llorch-models-rw
fi
user "$NODE_S3_ACCESS_KEY" "$NODE_S3_SECRET_KEY" llorch-node
echo "bucket $bucket ready"
