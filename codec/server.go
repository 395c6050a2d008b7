package codec

import (
	"net/http"
	"strings"

	"go.temporal.io/sdk/converter"

	"github.com/llorch/llorch/bearer"
)

// EnvServerToken is the bearer token `llorch codec-server` requires
// (never a flag: a flag shows in /proc and pprof's cmdline).
const EnvServerToken = "LLORCH_CODEC_SERVER_TOKEN"

// maxRequestBytes bounds a codec request body: the UI sends one event's
// payloads at a time, and Temporal refuses payloads above 2 MiB, so a
// request far larger is not a client of ours.
const maxRequestBytes = 16 << 20

// ServerOptions configure Handler.
type ServerOptions struct {
	// Token is the bearer token every /encode and /decode request must
	// carry; required.
	Token string
	// UIOrigins are the browser origins allowed to call (the Temporal UI's,
	// e.g. http://localhost:8233); none: no CORS headers, CLI only.
	UIOrigins []string
}

// Handler serves Temporal's codec-server protocol (POST .../encode and
// .../decode, payloads as protojson) for c, behind bearer auth, with CORS
// for the Temporal UI.
func Handler(c *Codec, o ServerOptions) http.Handler {
	inner := converter.NewPayloadCodecHTTPHandler(c)
	key := bearer.NewKey(o.Token, EnvServerToken)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if origin := r.Header.Get("Origin"); origin != "" && allowed(o.UIOrigins, origin) {
			h := w.Header()
			h.Set("Access-Control-Allow-Origin", origin)
			h.Set("Access-Control-Allow-Credentials", "true")
			h.Set("Access-Control-Allow-Methods", "POST, OPTIONS")
			h.Set("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Namespace")
			h.Add("Vary", "Origin")
		}
		// A preflight carries no credentials (browsers never send them).
		if r.Method == http.MethodOptions {
			w.WriteHeader(http.StatusOK)
			return
		}
		// No token configured is no access, never an open server.
		if key == nil {
			http.Error(w, "codec server has no token ("+EnvServerToken+")", http.StatusUnauthorized)
			return
		}
		if ref := key.Check(r.Header.Get("Authorization")); ref != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="llorch codec"`)
			http.Error(w, ref.Error(), http.StatusUnauthorized)
			return
		}
		if !strings.HasSuffix(r.URL.Path, "/encode") && !strings.HasSuffix(r.URL.Path, "/decode") {
			http.NotFound(w, r)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBytes)
		inner.ServeHTTP(w, r)
	})
}

func allowed(origins []string, origin string) bool {
	for _, o := range origins {
		if strings.EqualFold(strings.TrimSuffix(o, "/"), origin) {
			return true
		}
	}
	return false
}
