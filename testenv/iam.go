package testenv

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/llorch/llorch/config"
)

// AccountsS3 is a versitygw of one test's own with accounts (its internal
// IAM, --iam-dir): Root may do anything; User makes accounts of role
// "user", which reach a bucket only as its bucket policy allows.
type AccountsS3 struct {
	Root  config.S3
	bin   string
	admin string // the admin API's URL
}

// StartAccountsS3 starts it for t (stopped at its end), with the bucket
// named bucket (created by Root when a test first needs it).
func StartAccountsS3(t testing.TB, bucket string) *AccountsS3 {
	t.Helper()
	bin, err := Tool("versitygw")
	if err != nil {
		t.Skip(err.Error())
	}
	dir := t.TempDir()
	data, iam := filepath.Join(dir, "data"), filepath.Join(dir, "iam")
	for _, d := range []string{data, iam} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	adminPort, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := &AccountsS3{bin: bin, admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort),
		Root: config.S3{Endpoint: fmt.Sprintf("127.0.0.1:%d", port), AccessKey: "root-" + randomHex(4), SecretKey: randomHex(16),
			Bucket: bucket, Region: "us-east-1"}}
	var out bytes.Buffer
	cmd := exec.Command(bin, "--port", s.Root.Endpoint, "--admin-port", s.admin[len("http://"):], "--iam-dir", iam, "--quiet", "posix", data)
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+s.Root.AccessKey, "ROOT_SECRET_ACCESS_KEY="+s.Root.SecretKey)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start versitygw: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for _, addr := range []string{s.Root.Endpoint, s.admin[len("http://"):]} {
		Eventually(t, 30*time.Second, "versitygw listening on "+addr, func() (bool, string) {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return false, err.Error() + "\n" + out.String()
			}
			c.Close()
			return true, ""
		})
	}
	return s
}

// User creates an account of role "user" and returns the S3 settings that
// use it.
func (s *AccountsS3) User(t testing.TB, access string) config.S3 {
	t.Helper()
	secret := randomHex(16)
	// versitygw's admin CLI takes the new account's secret as a flag only: a
	// throwaway test secret for the blink of this command.
	cmd := exec.Command(s.bin, "admin", "--endpoint-url", s.admin, "create-user", "--access", access, "--secret", secret, "--role", "user")
	cmd.Env = append(os.Environ(), "ADMIN_ACCESS_KEY_ID="+s.Root.AccessKey, "ADMIN_SECRET_ACCESS_KEY="+s.Root.SecretKey)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("versitygw admin create-user %s: %v\n%s", access, err, out)
	}
	cfg := s.Root
	cfg.AccessKey, cfg.SecretKey = access, secret
	return cfg
}
