package apiclient

import (
	"context"
	"errors"
	"go/parser"
	"go/token"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// catalog is a fake apiserver holding one model, "tiny".
func catalog(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"code":"BAD_TOKEN","message":"bad bearer token"}`))
			return
		}
		switch r.Method + " " + r.URL.Path {
		case "GET /v2/catalog/models/tiny":
			_, _ = w.Write([]byte(`{"id":"tiny","key":"models/tiny.gguf","size":5}`))
		case "GET /v2/catalog/models":
			_, _ = w.Write([]byte(`{"models":[{"id":"tiny","size":5}],"count":1}` + "\n"))
		case "POST /v2/catalog/models":
			if r.Header.Get("Content-Type") != "application/json" {
				w.WriteHeader(http.StatusUnsupportedMediaType)
				return
			}
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{"model":{"id":"new","key":"models/new.gguf"}}`))
		case "DELETE /v2/catalog/models/tiny":
			w.WriteHeader(http.StatusNoContent)
		case "DELETE /v2/catalog/models/busy":
			w.WriteHeader(http.StatusConflict)
			_, _ = w.Write([]byte(`{"code":"MODEL_IN_USE","message":"model busy is staged on node-1","field":"id","retriable":true,"retry_after_ms":500}`))
		case "GET /v2/catalog/models/broken":
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte("<html>" + strings.Repeat("x", 400) + "</html>"))
		default:
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"code":"MODEL_NOT_FOUND","message":"model is not in the catalog"}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestCatalog(t *testing.T) {
	srv := catalog(t)
	c, err := New(srv.URL+"/", "tok")
	require.NoError(t, err)
	ctx := context.Background()

	e, found, err := c.Model(ctx, "tiny")
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, "models/tiny.gguf", e.Key)
	_, found, err = c.Model(ctx, "absent")
	require.NoError(t, err)
	require.False(t, found, "a 404 is not found, no error")

	l, err := c.ListModels(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, l.Count)
	require.Equal(t, "tiny", l.Models[0].ID)
	require.Equal(t, `{"models":[{"id":"tiny","size":5}],"count":1}`+"\n", string(l.Raw), "the answer as sent")

	e, err = c.RegisterModel(ctx, RegisterRequest{ID: "new", Key: "models/new.gguf"})
	require.NoError(t, err)
	require.Equal(t, "new", e.ID, "an entry wrapped as {\"model\": ...}")

	require.NoError(t, c.DeleteModel(ctx, "tiny"))
	err = c.DeleteModel(ctx, "absent")
	require.True(t, IsNotFound(err))
	err = c.DeleteModel(ctx, "busy")
	var ae *Error
	require.ErrorAs(t, err, &ae)
	require.Equal(t, Error{Status: 409, Envelope: Envelope{Code: "MODEL_IN_USE", Message: "model busy is staged on node-1", Field: "id",
		Retriable: true, RetryAfterMs: 500}}, *ae)
	require.EqualError(t, err, "MODEL_IN_USE: model busy is staged on node-1 (field id)")
	require.False(t, IsNotFound(err))
}

func TestErrors(t *testing.T) {
	srv := catalog(t)
	c, err := New(srv.URL, "tok")
	require.NoError(t, err)
	_, _, err = c.Model(context.Background(), "broken")
	var ae *Error
	require.ErrorAs(t, err, &ae, "a body that is no envelope")
	require.Equal(t, "HTTP_502", ae.Code)
	require.Contains(t, ae.Message, "GET "+srv.URL+"/v2/catalog/models/broken: <html>xxx")
	require.True(t, strings.HasSuffix(ae.Message, "..."), "cut at 300 characters")

	wrongToken, err := New(srv.URL, "")
	require.NoError(t, err)
	_, err = wrongToken.ListModels(context.Background())
	require.ErrorAs(t, err, &ae)
	require.Equal(t, http.StatusUnauthorized, ae.Status)
	require.Equal(t, "BAD_TOKEN", ae.Code)

	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	c, err = New(gone.URL, "")
	require.NoError(t, err)
	_, err = c.ListModels(context.Background())
	var unreachable *UnreachableError
	require.ErrorAs(t, err, &unreachable)
	require.Equal(t, gone.URL, unreachable.BaseURL)
	require.ErrorContains(t, err, "cannot reach the llorch apiserver at "+gone.URL+": ")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = c.ListModels(ctx)
	require.ErrorIs(t, err, context.Canceled)
	require.False(t, errors.As(err, &unreachable), "a cancelled request is not an unreachable apiserver")

	for _, bad := range []string{"", "127.0.0.1:8080", "ftp://x", "http://"} {
		_, err := New(bad, "")
		require.EqualError(t, err, strconv.Quote(bad)+": want http://host:port or https://host:port", bad)
	}
}

// The package is HTTP only: a Go program talks to llorch through it without
// Temporal, workflow or activity code.
func TestImportsNoTemporal(t *testing.T) {
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	for _, name := range files {
		src, err := os.ReadFile(name)
		require.NoError(t, err)
		f, err := parser.ParseFile(token.NewFileSet(), name, src, parser.ImportsOnly)
		require.NoError(t, err)
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			for _, banned := range []string{"go.temporal.io/", "github.com/llorch/llorch/workflows", "github.com/llorch/llorch/activities"} {
				require.False(t, strings.HasPrefix(path, banned), "%s imports %s", name, path)
			}
		}
	}
}
