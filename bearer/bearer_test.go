package bearer

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCheck(t *testing.T) {
	k := NewKey("s3cret", "LLORCH_X_TOKEN")
	require.Nil(t, k.Check("Bearer s3cret"))
	require.Nil(t, k.Check("bearer s3cret"), "the scheme is case-insensitive")
	for _, c := range []struct{ header, code, presented string }{
		{"", CodeMissing, ""},
		{"Bearer nope", CodeBad, Fingerprint("nope")},
		{"Bearer s3cretx", CodeBad, Fingerprint("s3cretx")},
		{"Basic s3cret", CodeBad, Fingerprint("s3cret")},
		{"s3cret", CodeBad, Fingerprint("s3cret")},
	} {
		r := k.Check(c.header)
		require.NotNil(t, r, c.header)
		require.Equal(t, c.code, r.Code, c.header)
		require.Equal(t, c.presented, r.Presented, c.header)
		require.NotContains(t, r.Message, "s3cret")
	}
	require.Contains(t, k.Check("").Message, "LLORCH_X_TOKEN")
	require.Nil(t, NewKey("", "X"), "no token: an open listener")
	require.Nil(t, NewKey("", "X").Check(""))
	require.Regexp(t, `^token:[0-9a-f]{6}$`, Fingerprint("s3cret"))
}

func TestLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:0": true, "localhost:80": true, "[::1]:9": true, "127.1.2.3:8": true,
		":8080": false, "0.0.0.0:1": false, "10.0.0.1:2": false, "example.com:3": false, "127.0.0.1": false,
	} {
		require.Equal(t, want, Loopback(addr), addr)
	}
}
