package cpuset

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestParseFormat(t *testing.T) {
	for in, want := range map[string]string{"1": "1", "0-3,8": "0-3,8", "3,1,2": "1-3", " 0 - 1 ": "", "5-5": "5"} {
		set, err := Parse(in)
		if want == "" {
			require.Error(t, err, in)
			continue
		}
		require.NoError(t, err, in)
		require.Equal(t, want, Format(set))
	}
	for _, bad := range []string{"", "a", "3-1", "-1", "1,", "2000"} {
		_, err := Parse(bad)
		require.Error(t, err, bad)
	}
}

func TestSplitAndPin(t *testing.T) {
	have, err := Of(0)
	require.NoError(t, err)
	if have.Count() < 2 {
		t.Skip("needs two CPUs")
	}
	last := Last(have)
	var engines unix.CPUSet
	engines.Set(last)
	rest, err := Split(engines)
	require.NoError(t, err)
	require.Equal(t, have.Count()-1, rest.Count())
	require.False(t, rest.IsSet(last))
	require.Equal(t, last, Last(engines))
	require.Equal(t, -1, Last(unix.CPUSet{}))

	_, err = Split(have)
	require.ErrorContains(t, err, "leave at least one")
	var absent unix.CPUSet
	absent.Set(1023)
	_, err = Split(absent)
	require.ErrorContains(t, err, "not available")

	// Pinning this process and back.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	reserved, err := Reserve(engines)
	require.NoError(t, err)
	require.Equal(t, Format(rest), Format(reserved))
	now, err := Of(0)
	require.NoError(t, err)
	require.Equal(t, Format(rest), Format(now))
	require.NoError(t, PinProcess(0, have))
	_, err = Reserve(have)
	require.ErrorContains(t, err, "leave at least one")
}
