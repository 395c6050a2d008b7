package config

import (
	"fmt"

	"github.com/dustin/go-humanize"
)

// ParseBytes reads v, a size such as 500GiB, 1.5TB or 0, given to flag.
func ParseBytes(flag, v string) (int64, error) {
	n, err := humanize.ParseBytes(v)
	if err != nil {
		return 0, fmt.Errorf("%s %q: want a size such as 500GiB", flag, v)
	}
	return int64(n), nil
}
