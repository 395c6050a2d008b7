package engine

import (
	"fmt"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"
)

type chatMessage struct{ Role, Content string }

// applyTemplate renders messages with the model's chat template, or ChatML
// when the model has none or llama.cpp's built-in templates do not recognise
// it (llama-server would run the Jinja template; we have no Jinja engine).
func applyTemplate(tmpl string, msgs []chatMessage) (string, error) {
	cm := make([]llama.ChatMessage, 0, len(msgs))
	for _, m := range msgs {
		cm = append(cm, llama.NewChatMessage(m.Role, m.Content))
	}
	for _, t := range []string{tmpl, "chatml"} {
		if t == "" {
			continue
		}
		size := 256
		for _, m := range msgs {
			size += 2 * (len(m.Role) + len(m.Content) + 16)
		}
		buf := make([]byte, size)
		n := llama.ChatApplyTemplate(t, cm, true, buf)
		if n > int32(len(buf)) {
			buf = make([]byte, n)
			n = llama.ChatApplyTemplate(t, cm, true, buf)
		}
		if n > 0 && n <= int32(len(buf)) {
			return string(buf[:n]), nil
		}
	}
	return "", fmt.Errorf("cannot apply a chat template to %d messages", len(msgs))
}

func nowUnix() int64 { return time.Now().Unix() }
