package apikey

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// The key registry: one workflow per namespace holds every key's record
// (never its secret, only the secret's SHA-256), and every apiserver
// replica polls its query into a cache.
const (
	// RegistryWorkflowType is the registered name of the registry workflow.
	RegistryWorkflowType = "APIKeys"
	// RegistryWorkflowID is the registry's workflow id (one per namespace).
	RegistryWorkflowID = "apikeys"
	// UpdateCreate adds a key (CreateRequest -> Record).
	UpdateCreate = "create"
	// UpdateRevoke revokes a key (RevokeRequest -> Record).
	UpdateRevoke = "revoke"
	// QueryKeys reads the registry (the version the caller has -> Snapshot;
	// Keys nil when the version is unchanged).
	QueryKeys = "keys"
)

// Error types of the registry's updates (and the API's codes).
const (
	ErrInvalid  = "INVALID_PARAMS"
	ErrNotFound = "KEY_NOT_FOUND"
	ErrExists   = "KEY_EXISTS"
)

// Bounds of the registry.
const (
	MaxNameLen = 64
	// MaxRecords bounds the registry's state (every record, revoked ones
	// included until pruned).
	MaxRecords = 4096
	// PruneAfter is how long a revoked or expired record is kept (so
	// GET and DELETE still know it) before a continue-as-new drops it.
	PruneAfter = 7 * 24 * time.Hour
)

// RegistryInput starts (and continues) the registry.
type RegistryInput struct {
	// StreamKey signs the per-task credentials nodes push token streams
	// with: a cluster secret of its own, so rotating API keys never breaks
	// a stream in flight. The first apiserver to start the registry
	// chooses it.
	StreamKey []byte   `json:"stream_key"`
	Records   []Record `json:"records,omitempty"`
	Version   int64    `json:"version,omitempty"`
	// ContinueAsNewAfterEvents: 0 is when Temporal suggests.
	ContinueAsNewAfterEvents int `json:"continue_as_new_after_events,omitempty"`
}

// Record is one key as the registry holds it.
type Record struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Scopes    []Scope   `json:"scopes"`
	NodeID    string    `json:"node_id,omitempty"`
	Hash      string    `json:"hash"` // hex SHA-256 of the whole token
	CreatedAt time.Time `json:"created_at"`
	CreatedBy Actor     `json:"created_by"`
	ExpiresAt time.Time `json:"expires_at,omitempty"`
	Limits    Limits    `json:"limits,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitempty"`
	RevokedBy Actor     `json:"revoked_by,omitempty"`
}

// Live says whether the key authenticates at now.
func (r Record) Live(now time.Time) bool {
	return r.RevokedAt.IsZero() && (r.ExpiresAt.IsZero() || now.Before(r.ExpiresAt))
}

// Principal is who a request with this key authenticates as.
func (r Record) Principal() Principal {
	return Principal{KeyID: r.ID, Name: r.Name, Scopes: r.Scopes, NodeID: r.NodeID, Limits: r.Limits, ExpiresAt: r.ExpiresAt}
}

// Snapshot is the registry's query answer.
type Snapshot struct {
	Version   int64    `json:"version"`
	StreamKey []byte   `json:"stream_key,omitempty"`
	Keys      []Record `json:"keys"` // nil: unchanged since the asked version
}

// CreateRequest adds a key. The apiserver generates the secret; only its
// hash reaches the registry.
type CreateRequest struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Scopes    []Scope   `json:"scopes"`
	NodeID    string    `json:"node_id,omitempty"`
	Hash      string    `json:"hash"`
	ExpiresAt time.Time `json:"expires_at,omitempty"`
	Limits    Limits    `json:"limits,omitempty"`
	CreatedBy Actor     `json:"created_by"`
}

// FieldError is a refused field of a request (the API names the field).
type FieldError struct {
	Field, Message string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Message }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Message: fmt.Sprintf(format, args...)}
}

var (
	idPattern     = regexp.MustCompile(`^k[0-9a-f]{16}$`)
	hashPattern   = regexp.MustCompile(`^[0-9a-f]{64}$`)
	nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
)

// ValidateID refuses anything but a key id NewToken makes.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return errors.New("a key id is k and 16 hex digits")
	}
	return nil
}

// Validate refuses a request the registry must not hold; now is the
// registry's clock (an expiry must lie ahead of it).
func (r CreateRequest) Validate(now time.Time) error {
	if err := ValidateID(r.ID); err != nil {
		return fieldErr("id", "%v", err)
	}
	if !hashPattern.MatchString(r.Hash) {
		return fieldErr("hash", "want the hex SHA-256 of the token")
	}
	if name := strings.TrimSpace(r.Name); name == "" || len(r.Name) > MaxNameLen || name != r.Name {
		return fieldErr("name", "required, 1-%d characters, no leading or trailing space", MaxNameLen)
	}
	for _, ch := range r.Name {
		if ch < 0x20 || ch == 0x7f {
			return fieldErr("name", "no control characters")
		}
	}
	if len(r.Scopes) == 0 {
		return fieldErr("scopes", "at least one of %v", Scopes)
	}
	seen := map[Scope]bool{}
	for _, s := range r.Scopes {
		if !s.Valid() {
			return fieldErr("scopes", "unknown scope %q: want %v", s, Scopes)
		}
		if seen[s] {
			return fieldErr("scopes", "scope %s given twice", s)
		}
		seen[s] = true
	}
	switch {
	case seen[Node] && r.NodeID == "":
		return fieldErr("node_id", "required with scope node: the one node the key acts for")
	case !seen[Node] && r.NodeID != "":
		return fieldErr("node_id", "only with scope node")
	case r.NodeID != "" && !nodeIDPattern.MatchString(r.NodeID):
		return fieldErr("node_id", "want 1-128 of [A-Za-z0-9._-], starting alphanumeric")
	}
	if !r.ExpiresAt.IsZero() && !r.ExpiresAt.After(now) {
		return fieldErr("expires_at", "%s is not in the future", r.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if r.Limits.RequestsPerMinute < 0 || r.Limits.TokensPerMinute < 0 || r.Limits.ConcurrentTasks < 0 {
		return fieldErr("limits", "must be >= 0 (0 is unlimited)")
	}
	return nil
}

// RevokeRequest revokes a key.
type RevokeRequest struct {
	ID string `json:"id"`
	By Actor  `json:"by"`
}

// TokenPrefix starts every key's token: llk_<key id>_<secret>, so the
// key id is readable from the token (logs, lookups) without the secret.
const TokenPrefix = "llk_"

// NewToken makes a fresh key id and its token (32 random bytes).
func NewToken() (id, token string, err error) {
	b := make([]byte, 8+32)
	if _, err := rand.Read(b); err != nil {
		return "", "", fmt.Errorf("no randomness for a key: %w", err)
	}
	id = "k" + hex.EncodeToString(b[:8])
	return id, TokenPrefix + id + "_" + base64.RawURLEncoding.EncodeToString(b[8:]), nil
}

// ParseToken reads the key id out of a token; false when it is not a key's.
func ParseToken(token string) (string, bool) {
	rest, ok := strings.CutPrefix(token, TokenPrefix)
	if !ok {
		return "", false
	}
	id, secret, ok := strings.Cut(rest, "_")
	if !ok || secret == "" || ValidateID(id) != nil {
		return "", false
	}
	return id, true
}

// Hash is what the registry keeps of a token: its hex SHA-256.
func Hash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}
