package apiserver

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// idParam reads the :id route parameter, checked by validate.
func idParam(c *fiber.Ctx, validate func(string) error) (string, error) {
	id := c.Params("id")
	if err := validate(id); err != nil {
		return "", invalidParam("id", "%v", err)
	}
	return id, nil
}

// idAndBody reads a request on one thing: its :id, read by param, then its
// JSON body into dst (see decode).
func idAndBody(c *fiber.Ctx, param func(*fiber.Ctx) (string, error), dst any, optional bool) (string, error) {
	id, err := param(c)
	if err != nil {
		return "", err
	}
	return id, decode(c, dst, optional)
}

// decode reads a JSON body strictly: unknown fields and wrong types are
// INVALID_PARAMS naming the field. An empty body is allowed when optional.
func decode(c *fiber.Ctx, dst any, optional bool) error {
	raw, err := readBody(c, maxBodyBytes)
	if err != nil {
		return err
	}
	body := bytes.TrimSpace(raw)
	if len(body) == 0 {
		if optional {
			return nil
		}
		return invalidParam("body", "a JSON object is required")
	}
	if ct := c.Get(fiber.HeaderContentType); ct != "" && !strings.HasPrefix(ct, fiber.MIMEApplicationJSON) {
		return invalidParam("body", "Content-Type must be application/json, got %q", ct)
	}
	return decodeStrict(body, dst)
}

// typeErrorParam names the field a JSON value of the wrong type was for
// ("body" when the body itself is not an object).
func typeErrorParam(e *json.UnmarshalTypeError) *Error {
	field := e.Field
	if field == "" {
		field = "body"
	}
	return invalidParam(field, "want %s, got JSON %s", e.Type, e.Value)
}

// decodeStrict reads one JSON object into dst: unknown fields, wrong types
// and trailing data are INVALID_PARAMS naming the field.
func decodeStrict(body []byte, dst any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		var typeErr *json.UnmarshalTypeError
		var syntaxErr *json.SyntaxError
		switch {
		case errors.As(err, &typeErr):
			return typeErrorParam(typeErr)
		case errors.As(err, &syntaxErr):
			return invalidParam("body", "malformed JSON at byte %d: %v", syntaxErr.Offset, err)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			field := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			if field == "" {
				return invalidParam("body", `unknown field ""`)
			}
			return invalidParam(field, "unknown field")
		default:
			return invalidParam("body", "%v", err)
		}
	}
	if dec.Decode(&struct{}{}) != io.EOF {
		return invalidParam("body", "trailing data after the JSON object")
	}
	return nil
}

// readBody reads a request body of at most limit bytes however it is
// framed. Bodies stream (StreamRequestBody, for model uploads), so fiber's
// BodyLimit bounds nothing here: a Content-Length above limit is refused
// unread, a chunked body as soon as it passes limit. A refused body is
// never read to its end: the connection closes after the answer.
func readBody(c *fiber.Ctx, limit int) ([]byte, error) {
	if n := c.Request().Header.ContentLength(); n > limit {
		return nil, bodyTooLarge(c, fmt.Sprintf("body of %d bytes exceeds %d", n, limit))
	}
	r := c.Context().RequestBodyStream()
	if r == nil { // no body, or one read whole (app.Test)
		if b := c.Body(); len(b) > limit {
			return nil, bodyTooLarge(c, fmt.Sprintf("body of %d bytes exceeds %d", len(b), limit))
		}
		return c.Body(), nil
	}
	b, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		c.Context().SetConnectionClose()
		return nil, invalidParam("body", "reading the body: %v", err)
	}
	if len(b) > limit {
		return nil, bodyTooLarge(c, fmt.Sprintf("body exceeds %d bytes", limit))
	}
	return b, nil
}

func bodyTooLarge(c *fiber.Ctx, msg string) error {
	c.Context().SetConnectionClose()
	e := apiError(fiber.StatusRequestEntityTooLarge, CodeInvalidParams, "body: %s", msg)
	e.Field = "body"
	return e
}

// decodeLooseBytes reads a JSON body, leaving fields dst does not name
// alone (/v1 checks those itself, checkOpenAIFields); wrong types name
// the field.
func decodeLooseBytes(body []byte, dst any) error {
	if len(body) == 0 {
		return invalidParam("body", "a JSON object is required")
	}
	if err := json.Unmarshal(body, dst); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return typeErrorParam(typeErr)
		}
		return invalidParam("body", "%v", err)
	}
	return nil
}
