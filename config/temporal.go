package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/pflag"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	tlog "go.temporal.io/sdk/log"

	"github.com/llorch/llorch/codec"
)

// Temporal says how to reach the Temporal cluster, dev or production.
type Temporal struct {
	Address    string
	Namespace  string
	TLS        bool
	CACert     string
	ClientCert string
	ClientKey  string
	ServerName string
	APIKey     string
	// Compression of gRPC requests: gzip (the SDK's default) or none.
	Compression string
	// CodecKeys are the payload codec's keys (LLORCH_CODEC_KEYS, a secret:
	// env, file or dev.env, never a flag); empty: payloads in plaintext.
	CodecKeys string
}

// AddTemporalFlags defines the Temporal connection flags on fs.
func AddTemporalFlags(fs *pflag.FlagSet, t *Temporal) {
	fs.StringVar(&t.Address, "temporal-address", "127.0.0.1:7233", "Temporal frontend host:port")
	fs.StringVar(&t.Namespace, "temporal-namespace", "default", "Temporal namespace")
	fs.BoolVar(&t.TLS, "temporal-tls", false, "connect to Temporal over TLS (implied by the other TLS flags and the API key)")
	fs.StringVar(&t.CACert, "temporal-tls-ca", "", "PEM file of the CA that signed the Temporal server certificate")
	fs.StringVar(&t.ClientCert, "temporal-tls-cert", "", "PEM client certificate for mTLS")
	fs.StringVar(&t.ClientKey, "temporal-tls-key", "", "PEM client key for mTLS")
	fs.StringVar(&t.ServerName, "temporal-tls-server-name", "", "server name to verify in the Temporal certificate")
	AddSecret(fs, &t.APIKey, "temporal-api-key", "Temporal Cloud API key (sent as a bearer credential over TLS)")
	AddSecret(fs, &t.CodecKeys, "codec-keys", "payload codec keys, id:base64key,… (AES-256; the first encrypts, all decrypt; the same on every apiserver and worker)")
	fs.StringVar(&t.Compression, "temporal-grpc-compression", "gzip", "compression of requests to Temporal: gzip (for slow links, Temporal Cloud) or none (saves CPU on both ends in one datacenter)")
}

// ClientOptions builds SDK client options; identity names the process in the UI.
// Every client llorch builds gets its data converter here, so the control
// plane and the workers encrypt and decrypt with the same codec.
func (t Temporal) ClientOptions(logger *slog.Logger, identity string) (client.Options, error) {
	opts := client.Options{
		HostPort:  t.Address,
		Namespace: t.Namespace,
		Identity:  identity,
		Logger:    tlog.NewStructuredLogger(logger.With("subsystem", "temporal-sdk")),
	}
	dc, err := PayloadConverter(logger, t.CodecKeys)
	if err != nil {
		return opts, err
	}
	opts.DataConverter = dc
	tlsCfg, err := t.tlsConfig()
	if err != nil {
		return opts, err
	}
	opts.ConnectionOptions.TLS = tlsCfg
	switch t.Compression {
	case "", "gzip":
		opts.ConnectionOptions.GrpcCompression = &client.GrpcCompressionGzip{}
	case "none":
		opts.ConnectionOptions.GrpcCompression = &client.GrpcCompressionNone{}
	default:
		return opts, fmt.Errorf("--temporal-grpc-compression: want gzip or none, got %q", t.Compression)
	}
	if t.APIKey != "" {
		opts.Credentials = client.NewAPIKeyStaticCredentials(t.APIKey)
	}
	return opts, nil
}

// PayloadConverter is the data converter of llorch's Temporal clients: the
// payload codec over the SDK's default, or the default alone without keys,
// which the log says at start.
func PayloadConverter(logger *slog.Logger, keys string) (converter.DataConverter, error) {
	if keys == "" {
		logger.Warn("no payload codec keys: workflow inputs, results and heartbeats go to Temporal in plaintext (set " +
			codec.EnvKeys + " or " + codec.EnvKeys + FileSuffix + ")")
		return codec.DataConverter(nil), nil
	}
	c, err := codec.Parse(keys)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", codec.EnvKeys, err)
	}
	logger.Info("payloads to Temporal are encrypted", "key_id", c.KeyID(), "keys", len(c.KeyIDs()))
	return codec.DataConverter(c), nil
}

func (t Temporal) tlsConfig() (*tls.Config, error) {
	if !t.TLS && t.CACert == "" && t.ClientCert == "" && t.APIKey == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CACert != "" {
		pem, err := os.ReadFile(t.CACert)
		if err != nil {
			return nil, fmt.Errorf("--temporal-tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--temporal-tls-ca: no PEM certificate in %s", t.CACert)
		}
		cfg.RootCAs = pool
	}
	if (t.ClientCert == "") != (t.ClientKey == "") {
		return nil, fmt.Errorf("mTLS needs both --temporal-tls-cert and --temporal-tls-key")
	}
	if t.ClientCert != "" {
		pair, err := tls.LoadX509KeyPair(t.ClientCert, t.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("--temporal-tls-cert/--temporal-tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}
