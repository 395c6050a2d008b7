package apiclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"

	"github.com/llorch/llorch/model"
)

const modelsPath = "/v2/catalog/models"

// RegisterRequest is the body of POST /v2/catalog/models: it registers an
// object already in the bucket.
type RegisterRequest struct {
	ID      string `json:"id"`
	Key     string `json:"key"`
	SHA256  string `json:"sha256"`
	Size    int64  `json:"size"`
	Replace bool   `json:"replace"`
	// SourceKey is where the new content was uploaded when it replaces
	// a model in place; the apiserver copies it to Key once accepted.
	SourceKey string `json:"source_key,omitempty"`
}

// ModelList is the answer of GET /v2/catalog/models.
type ModelList struct {
	Models []model.Entry `json:"models"`
	Count  int           `json:"count"`
	// Raw is the answer as the apiserver sent it.
	Raw json.RawMessage `json:"-"`
}

// IsNotFound says whether err is a 404 answer.
func IsNotFound(err error) bool {
	var ae *Error
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

func modelPath(id string) string { return modelsPath + "/" + url.PathEscape(id) }

// Model is GET /v2/catalog/models/{id}; a 404 is found == false.
func (c *Client) Model(ctx context.Context, id string) (e model.Entry, found bool, err error) {
	raw, err := c.Call(ctx, http.MethodGet, modelPath(id), nil)
	if IsNotFound(err) {
		return model.Entry{}, false, nil
	}
	if err != nil {
		return model.Entry{}, false, err
	}
	e, err = decodeEntry(raw)
	return e, err == nil, err
}

// RegisterModel is POST /v2/catalog/models; the apiserver hashes the object
// before it answers with the entry, so give ctx time for that.
func (c *Client) RegisterModel(ctx context.Context, r RegisterRequest) (model.Entry, error) {
	raw, err := c.Call(ctx, http.MethodPost, modelsPath, r)
	if err != nil {
		return model.Entry{}, err
	}
	return decodeEntry(raw)
}

// ListModels is GET /v2/catalog/models.
func (c *Client) ListModels(ctx context.Context) (ModelList, error) {
	raw, err := c.Call(ctx, http.MethodGet, modelsPath, nil)
	if err != nil {
		return ModelList{}, err
	}
	var l ModelList
	if err := json.Unmarshal(raw, &l); err != nil {
		return ModelList{}, fmt.Errorf("GET %s%s: unexpected answer: %w", c.base, modelsPath, err)
	}
	l.Raw = raw
	return l, nil
}

// DeleteModel is DELETE /v2/catalog/models/{id}.
func (c *Client) DeleteModel(ctx context.Context, id string) error {
	_, err := c.Call(ctx, http.MethodDelete, modelPath(id), nil)
	return err
}

// decodeEntry reads an entry, bare or wrapped as {"model": {...}} or
// {"entry": {...}}.
func decodeEntry(raw []byte) (model.Entry, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return model.Entry{}, fmt.Errorf("unexpected answer from the apiserver (want a catalog entry): %w", err)
	}
	if _, ok := fields["id"]; !ok {
		for _, k := range []string{"model", "entry"} {
			if inner, ok := fields[k]; ok {
				raw = inner
				break
			}
		}
	}
	var e model.Entry
	if err := json.Unmarshal(raw, &e); err != nil || e.ID == "" {
		return model.Entry{}, fmt.Errorf("unexpected answer from the apiserver (want a catalog entry): %s", truncate(string(raw), 300))
	}
	return e, nil
}
