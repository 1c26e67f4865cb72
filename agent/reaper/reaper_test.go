package reaper

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestOwnChildren(t *testing.T) {
	r := New(false)
	defer r.Close()
	p, err := r.Start(exec.Command("sh", "-c", "exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	if st := p.Wait(); st != (Status{Code: 3}) {
		t.Fatalf("exit 3: %+v", st)
	}
	p, err = r.Start(exec.Command("sleep", "100"))
	if err != nil {
		t.Fatal(err)
	}
	syscall.Kill(p.Pid, syscall.SIGKILL)
	if st := p.Wait(); st != (Status{Code: 137, Signal: 9}) || st.String() != "killed by signal 9 (SIGKILL)" {
		t.Fatalf("killed: %+v %s", st, st)
	}
	// Children started elsewhere in the process are left to their owners.
	other := exec.Command("sh", "-c", "exit 5")
	if err := other.Run(); other.ProcessState.ExitCode() != 5 {
		t.Fatalf("a foreign child's status was stolen: %v", err)
	}
	if _, err := r.Start(&exec.Cmd{Path: "/bin/true", Stdout: &strings.Builder{}}); err == nil {
		t.Fatal("non-file stdio accepted")
	}
}

// TestOrphans makes this process a subreaper, so orphans of its children come to it as they
// would to PID 1, and checks they are all collected and every started child is reported.
func TestOrphans(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("no subreaper: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	r := New(true)
	defer r.Close()
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := r.Start(exec.Command("sh", "-c", "(sleep 0.1 &); exit $0", "7"))
			if err != nil {
				t.Error(err)
				return
			}
			if st := p.Wait(); st.Code != 7 {
				t.Errorf("child %d: %+v", i, st)
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for r.Orphans() < 50 {
		if time.Now().After(deadline) {
			t.Fatalf("reaped %d orphans, want 50", r.Orphans())
		}
		time.Sleep(20 * time.Millisecond)
	}
	var kids []string
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		kids = append(kids, strings.Fields(string(b))...)
	}
	for _, pid := range kids {
		st, _ := os.ReadFile("/proc/" + pid + "/stat")
		if strings.Contains(string(st), ") Z ") {
			t.Errorf("zombie left: %s", st)
		}
	}
}
