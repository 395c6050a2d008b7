package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/spf13/pflag"
)

// ServerTLS is the certificate a listener serves (the API, the node
// link): PEM files, reread when they change, so a renewed certificate is
// served without a restart.
type ServerTLS struct {
	Cert, Key string
	// flag is the flags' common prefix ("tls", "link-tls"), for errors.
	flag string
}

// AddServerTLSFlags defines --<prefix>-cert and --<prefix>-key; what names
// the listener in their usage.
func AddServerTLSFlags(fs *pflag.FlagSet, t *ServerTLS, prefix, what string) {
	t.flag = prefix
	fs.StringVar(&t.Cert, prefix+"-cert", "", "PEM certificate (chain) "+what+" serves over HTTPS; reread when the file changes")
	fs.StringVar(&t.Key, prefix+"-key", "", "PEM private key of --"+prefix+"-cert")
}

// certReload is how often a handshake may look at the files for a change.
const certReload = time.Second

// Config is the server side of TLS: nil when no certificate is set. The
// pair must load now; later a pair that does not load (a renewal half
// written) leaves the previous one served until it does.
func (t ServerTLS) Config() (*tls.Config, error) {
	if t.Cert == "" && t.Key == "" {
		return nil, nil
	}
	if t.Cert == "" || t.Key == "" {
		return nil, fmt.Errorf("TLS needs both --%s-cert and --%s-key", t.flag, t.flag)
	}
	r := &certFiles{cert: t.Cert, key: t.Key}
	if err := r.load(); err != nil {
		return nil, fmt.Errorf("--%s-cert/--%s-key: %w", t.flag, t.flag, err)
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return r.get(), nil },
		// HTTP/1.1: fasthttp (the API) speaks nothing else, and SSE and
		// long-polls need nothing more.
		NextProtos: []string{"http/1.1"},
	}, nil
}

// certFiles holds the last pair loaded from cert and key.
type certFiles struct {
	cert, key string
	mu        sync.Mutex
	pair      *tls.Certificate
	mod       [2]time.Time // the files' mtimes when pair was loaded
	checked   time.Time
}

func (r *certFiles) mtimes() ([2]time.Time, error) {
	var out [2]time.Time
	for i, p := range []string{r.cert, r.key} {
		fi, err := os.Stat(p)
		if err != nil {
			return out, err
		}
		out[i] = fi.ModTime()
	}
	return out, nil
}

func (r *certFiles) load() error {
	mod, err := r.mtimes()
	if err != nil {
		return err
	}
	pair, err := tls.LoadX509KeyPair(r.cert, r.key)
	if err != nil {
		return err
	}
	r.pair, r.mod = &pair, mod
	return nil
}

func (r *certFiles) get() *tls.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := time.Now(); now.Sub(r.checked) >= certReload {
		r.checked = now
		if mod, err := r.mtimes(); err == nil && mod != r.mod {
			_ = r.load() // on failure the previous pair stays
		}
	}
	return r.pair
}

// CAPool reads the PEM CA certificates of file; flag names the setting in
// errors.
func CAPool(flag, file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate in %s", flag, file)
	}
	return pool, nil
}

// ClientTLS trusts the CA certificates of file (as curl's --cacert: in
// place of the system's roots); nil, the system's roots, when file is empty.
func ClientTLS(flag, file string) (*tls.Config, error) {
	if file == "" {
		return nil, nil
	}
	pool, err := CAPool(flag, file)
	if err != nil {
		return nil, err
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}, nil
}

// WithClientTLS is a copy of base whose transport uses cfg (nil: base
// itself); base's transport must be an *http.Transport or nil (the
// default one).
func WithClientTLS(base *http.Client, cfg *tls.Config) *http.Client {
	if cfg == nil {
		return base
	}
	var tr *http.Transport
	if t, ok := base.Transport.(*http.Transport); ok && t != nil {
		tr = t.Clone()
	} else {
		tr = http.DefaultTransport.(*http.Transport).Clone()
	}
	tr.TLSClientConfig = cfg
	c := *base
	c.Transport = tr
	return &c
}
