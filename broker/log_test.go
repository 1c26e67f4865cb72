package broker_test

import (
	"testing"

	"github.com/rs/zerolog"
)

// brokerLog sends the logs of the code under test to the test log.
func brokerLog(t testing.TB) zerolog.Logger {
	return zerolog.New(zerolog.TestWriter{T: t}).Level(zerolog.InfoLevel)
}
