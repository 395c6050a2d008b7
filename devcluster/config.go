package devcluster

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/llorch/node"
)

// Default ports: those of the Temporal CLI dev server (gRPC and UI), of
// versitygw and MinIO-style S3 setups, and the apiserver's own default, so the
// dev cluster looks like the documented production layout.
const (
	DefaultTemporalPort      = 7233
	DefaultUIPort            = 8233
	DefaultS3Port            = 7070
	DefaultAPIPort           = 8080
	DefaultWorkerMetricsPort = 9200
	DefaultBucket            = "llorch-models"
)

// Install hints name the exact versions known to work here (see
// shared/FACTS.md): newer Temporal CLIs cannot be `go install`ed.
const (
	temporalInstall  = "go install github.com/temporalio/cli/cmd/temporal@v1.5.1"
	versitygwInstall = "go install github.com/versity/versitygw/cmd/versitygw@v1.8.0"
)

// Config is what `llorch dev` needs. Zero values mean the defaults (see
// WithDefaults), so tests can set only what they care about.
type Config struct {
	// Home is the state dir: dev.env, the Temporal database, the S3 data,
	// the node's model catalog.
	Home string
	// NodeID names the local node; default dev-<short hostname>.
	NodeID string
	// TemporalBin and VersitygwBin are the server binaries; empty means
	// ./bin/<name> if it exists, else <name> on PATH.
	TemporalBin  string
	VersitygwBin string
	// Exe is the llorch binary run as apiserver and worker; empty means this
	// executable (os.Executable).
	Exe    string
	Bucket string

	TemporalPort      int
	UIPort            int
	S3Port            int
	APIPort           int
	WorkerMetricsPort int

	// APIServers is how many apiserver replicas run (default 1). With more
	// than one they listen on free loopback ports and a round-robin
	// balancer in this process takes the API port.
	APIServers int

	// ReadyTimeout bounds each child's start (default 60 s); StopGrace is
	// how long a child may take to exit after SIGTERM before SIGKILL
	// (default 10 s).
	ReadyTimeout time.Duration
	StopGrace    time.Duration
}

// WithDefaults fills every zero field.
func (c Config) WithDefaults() Config {
	if c.Home == "" {
		c.Home = ".llorch"
	}
	if c.NodeID == "" {
		c.NodeID = DefaultNodeID()
	}
	if c.Bucket == "" {
		c.Bucket = DefaultBucket
	}
	setDefault(&c.TemporalPort, DefaultTemporalPort)
	setDefault(&c.UIPort, DefaultUIPort)
	setDefault(&c.S3Port, DefaultS3Port)
	setDefault(&c.APIPort, DefaultAPIPort)
	setDefault(&c.WorkerMetricsPort, DefaultWorkerMetricsPort)
	setDefault(&c.APIServers, 1)
	if c.ReadyTimeout <= 0 {
		c.ReadyTimeout = 60 * time.Second
	}
	if c.StopGrace <= 0 {
		c.StopGrace = 10 * time.Second
	}
	return c
}

func setDefault(p *int, v int) {
	if *p == 0 {
		*p = v
	}
}

// DefaultNodeID is dev-<short hostname>, squeezed into what node.ValidateID
// accepts: the id becomes part of workflow ids and task queue names, and a
// hostname may hold upper case, underscores at the ends or be too long.
func DefaultNodeID() string {
	h, _ := os.Hostname()
	return SanitizeNodeID("dev-" + strings.SplitN(h, ".", 2)[0])
}

// SanitizeNodeID maps s onto the node id alphabet: lower case, runs of other
// characters become one '-', at most 63 characters, alphanumeric at both ends.
func SanitizeNodeID(s string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(s) {
		ok := (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '.' || r == '_' || r == '-'
		if !ok {
			if !dash {
				b.WriteByte('-')
			}
			dash = true
			continue
		}
		dash = r == '-'
		b.WriteRune(r)
	}
	id := b.String()
	if len(id) > 63 {
		id = id[:63]
	}
	id = strings.TrimFunc(id, func(r rune) bool { return r == '.' || r == '_' || r == '-' })
	if node.ValidateID(id) != nil {
		return "dev"
	}
	return id
}

// MaxAPIServers bounds --apiservers: each replica is a full apiserver with
// its own control worker, and more than this on one machine only measures
// the machine.
const MaxAPIServers = 16

// Validate checks what can be checked before anything starts.
func (c Config) Validate() error {
	if err := node.ValidateID(c.NodeID); err != nil {
		return fmt.Errorf("--node-id: %w", err)
	}
	return ValidateAPIServers(c.APIServers)
}

// ValidateAPIServers checks a replica count as given: the CLI calls it
// before WithDefaults, which would read 0 as "the default".
func ValidateAPIServers(n int) error {
	if n < 1 || n > MaxAPIServers {
		return fmt.Errorf("--apiservers %d: must be 1 to %d (LLORCH_APISERVERS sets it too)", n, MaxAPIServers)
	}
	return nil
}

// port is one port the dev cluster will bind, with what the user needs to
// move it.
type port struct {
	n    int
	what string
	flag string
}

func (c Config) ports() []port {
	return []port{
		{c.TemporalPort, "Temporal gRPC", "--temporal-port"},
		{c.UIPort, "Temporal UI", "--ui-port"},
		{c.S3Port, "S3", "--s3-port"},
		{c.APIPort, "REST API", "--api-port"},
		{c.WorkerMetricsPort, "worker metrics", "--worker-metrics-port"},
	}
}

// CheckPorts binds and releases every port before anything starts. Without
// it a taken port shows up as a child dying half-way through start-up with
// its own wording; here the message names the port, its use and the flag.
// It also catches two flags set to the same port.
func (c Config) CheckPorts() error {
	seen := map[int]port{}
	for _, p := range c.ports() {
		if p.n <= 0 || p.n > 65535 {
			return fmt.Errorf("port %d (%s) is not a valid port: pick another with %s", p.n, p.what, p.flag)
		}
		if q, dup := seen[p.n]; dup {
			return fmt.Errorf("port %d is given both for %s (%s) and for %s (%s): pick another with one of them", p.n, q.what, q.flag, p.what, p.flag)
		}
		seen[p.n] = p
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p.n)))
		if err != nil {
			return fmt.Errorf("port %d (%s) is in use: pick another with %s (%v)", p.n, p.what, p.flag, errors.Unwrap(err))
		}
		_ = ln.Close()
	}
	return nil
}

// ResolveBin finds a server binary: the flag's value, else ./bin/<name> (where
// `just dev` installs it), else <name> on PATH.
func ResolveBin(name, flagValue, flag, install string) (string, error) {
	hint := fmt.Sprintf("run `just dev` (which installs it into ./bin) or `%s`", install)
	if flagValue != "" {
		p, err := exec.LookPath(flagValue)
		if err != nil {
			return "", fmt.Errorf("%s %s: %w; %s", flag, flagValue, err, hint)
		}
		return p, nil
	}
	local := filepath.Join("bin", name)
	if fi, err := os.Stat(local); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
		return filepath.Abs(local)
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found (not given with %s, not in ./bin, not on PATH): %s", name, flag, hint)
}
