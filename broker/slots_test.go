package broker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
)

func TestSlotsReserve(t *testing.T) {
	s := broker.NewSlots(3)
	ctx := context.Background()
	if err := s.Reserve(ctx, 2); err != nil || s.InUse() != 2 {
		t.Fatalf("Reserve(2) of 3: %v, in use %d", err, s.InUse())
	}
	// Two more do not fit: the wait ends with ctx and takes nothing.
	sctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	err := s.Reserve(sctx, 2)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || s.InUse() != 2 {
		t.Fatalf("Reserve(2) with 1 free: %v, in use %d", err, s.InUse())
	}
	// A waiting Reserve goes ahead of Acquire: the freed slots are its.
	got := make(chan error, 1)
	go func() { got <- s.Reserve(ctx, 2) }()
	for s.InUse() != 2 {
		time.Sleep(time.Millisecond)
	}
	acquired := make(chan int, 1)
	time.Sleep(20 * time.Millisecond) // the Reserve is waiting by now
	go func() {
		n, _ := s.Acquire(ctx, 1)
		acquired <- n
	}()
	time.Sleep(20 * time.Millisecond)
	select {
	case <-acquired:
		t.Fatal("Acquire took the free slot while a Reserve waited")
	default:
	}
	s.Release(2)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	// The Reserve holds 2; the Acquire gets the last one once the Reserve is done waiting.
	if n := <-acquired; n != 1 || s.InUse() != 3 {
		t.Fatalf("Acquire got %d, in use %d", n, s.InUse())
	}
	s.Release(3)
	if err := s.Reserve(ctx, 0); err != nil || s.InUse() != 0 {
		t.Fatalf("Reserve(0): %v, in use %d", err, s.InUse())
	}
}
