package bearer

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net"
	"strings"
)

// Error codes of a refused credential, as the error envelope carries them.
const (
	CodeMissing = "MISSING_TOKEN"
	CodeBad     = "BAD_TOKEN"
)

// Fingerprint is how a token appears in logs: never the token itself.
func Fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return "token:" + hex.EncodeToString(sum[:])[:6]
}

// Key is the token a listener accepts, held as its digest. A nil Key
// accepts every request (an open, loopback-only listener).
type Key struct {
	digest [sha256.Size]byte
	env    string
}

// NewKey holds token; env names where callers configure it, for the
// message of a missing credential. An empty token gives nil.
func NewKey(token, env string) *Key {
	if token == "" {
		return nil
	}
	return &Key{digest: sha256.Sum256([]byte(token)), env: env}
}

// Refusal is a credential a Key did not accept.
type Refusal struct {
	Code    string // CodeMissing or CodeBad
	Message string
	// Presented is the fingerprint of the credential offered, "" when the
	// request had none.
	Presented string
}

func (r *Refusal) Error() string { return r.Code + ": " + r.Message }

// Check reads an Authorization header value; nil means accepted. Comparing
// digests keeps the time independent of the presented token's length too.
func (k *Key) Check(authorization string) *Refusal {
	if k == nil {
		return nil
	}
	if authorization == "" {
		return &Refusal{Code: CodeMissing, Message: "missing bearer token: send Authorization: Bearer <" + k.env + ">"}
	}
	scheme, token, ok := strings.Cut(authorization, " ")
	if !ok {
		token = authorization
	}
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return &Refusal{Code: CodeBad, Message: "malformed Authorization header: want Bearer <token>",
			Presented: Fingerprint(token)}
	}
	sum := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(sum[:], k.digest[:]) != 1 {
		return &Refusal{Code: CodeBad, Message: "bearer token not accepted", Presented: Fingerprint(token)}
	}
	return nil
}

// Loopback says whether addr (host:port) binds loopback only: the one kind
// of address a listener without a token may use.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
