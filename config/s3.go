package config

import "github.com/spf13/pflag"

// S3 says where models live (MinIO in production, versitygw in dev and tests).
type S3 struct {
	Endpoint  string
	AccessKey string
	SecretKey string
	Bucket    string
	Region    string
	TLS       bool
}

// AddS3Flags defines the object store flags on fs.
func AddS3Flags(fs *pflag.FlagSet, s *S3) {
	fs.StringVar(&s.Endpoint, "s3-endpoint", "127.0.0.1:7070", "S3 endpoint host:port (MinIO, versitygw)")
	AddSecret(fs, &s.AccessKey, "s3-access-key", "S3 access key")
	AddSecret(fs, &s.SecretKey, "s3-secret-key", "S3 secret key")
	fs.StringVar(&s.Bucket, "s3-bucket", "llorch-models", "bucket that holds the GGUF models")
	fs.StringVar(&s.Region, "s3-region", "us-east-1", "S3 region")
	fs.BoolVar(&s.TLS, "s3-tls", false, "use https for S3")
}
