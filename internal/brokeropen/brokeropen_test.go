package brokeropen

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestRedact_HidesPasswords(t *testing.T) {
	got := redact("nats://app:s3cret@10.0.0.1:4222")
	if strings.Contains(got, "s3cret") || !strings.Contains(got, "app:") {
		t.Errorf("redact = %q, want the user kept and the password hidden", got)
	}
	if got := redact("nats://%zz"); strings.Contains(got, "%zz") {
		t.Errorf("redact of an unparsable URL = %q, want it withheld", got)
	}
}

func TestOpen_UnknownSpecSaysWhatIsAccepted(t *testing.T) {
	_, err := Open(context.Background(), "amqp://localhost", t.TempDir(), nil)
	if !errors.Is(err, ErrUnknownSpec) {
		t.Fatalf("err = %v, want ErrUnknownSpec", err)
	}
	if !strings.Contains(err.Error(), `"nats"`) || !strings.Contains(err.Error(), "kafka://") {
		t.Errorf("error %q does not list the accepted specs", err)
	}
}
