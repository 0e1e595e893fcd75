package amqp

import (
	"errors"
	"strconv"
)

// Reply codes from the spec's constants, with RabbitMQ's meaning.
const (
	replySuccess            = 200
	replyContentTooLarge    = 311
	replyNoRoute            = 312
	replyNoConsumers        = 313
	replyConnectionForced   = 320
	replyInvalidPath        = 402
	replyAccessRefused      = 403
	replyNotFound           = 404
	replyResourceLocked     = 405
	replyPreconditionFailed = 406
	replyFrameError         = 501
	replySyntaxError        = 502
	replyCommandInvalid     = 503
	replyChannelError       = 504
	replyUnexpectedFrame    = 505
	replyResourceError      = 506
	replyNotAllowed         = 530
	replyNotImplemented     = 540
	replyInternalError      = 541
)

// ErrServerClosed is returned by Serve and ListenAndServe after Shutdown.
var ErrServerClosed = errors.New("amqp: server closed")

// Error is an AMQP exception sent in channel.close or connection.close.
type Error struct {
	Code              uint16 // reply code, e.g. 404
	Text              string // ≤255 bytes: "NOT_FOUND - no queue 'q' in vhost '/'"
	ClassID, MethodID uint16 // method that failed; 0 if none
}

// Error returns the reply code and text.
func (e *Error) Error() string {
	return "amqp: " + strconv.Itoa(int(e.Code)) + " " + e.Text
}

// Hard reports whether Code closes the connection (320 402 501-506 530 540 541);
// soft codes (311 312 313 403 404 405 406) close only the channel.
func (e *Error) Hard() bool {
	switch e.Code {
	case replyContentTooLarge, replyNoRoute, replyNoConsumers, replyAccessRefused,
		replyNotFound, replyResourceLocked, replyPreconditionFailed:
		return false
	}
	return true
}

// replyName is the upper-case name RabbitMQ puts before the reply text.
func replyName(code uint16) string {
	switch code {
	case replySuccess:
		return "OK"
	case replyContentTooLarge:
		return "CONTENT_TOO_LARGE"
	case replyNoRoute:
		return "NO_ROUTE"
	case replyNoConsumers:
		return "NO_CONSUMERS"
	case replyConnectionForced:
		return "CONNECTION_FORCED"
	case replyInvalidPath:
		return "INVALID_PATH"
	case replyAccessRefused:
		return "ACCESS_REFUSED"
	case replyNotFound:
		return "NOT_FOUND"
	case replyResourceLocked:
		return "RESOURCE_LOCKED"
	case replyPreconditionFailed:
		return "PRECONDITION_FAILED"
	case replyFrameError:
		return "FRAME_ERROR"
	case replySyntaxError:
		return "SYNTAX_ERROR"
	case replyCommandInvalid:
		return "COMMAND_INVALID"
	case replyChannelError:
		return "CHANNEL_ERROR"
	case replyUnexpectedFrame:
		return "UNEXPECTED_FRAME"
	case replyResourceError:
		return "RESOURCE_ERROR"
	case replyNotAllowed:
		return "NOT_ALLOWED"
	case replyNotImplemented:
		return "NOT_IMPLEMENTED"
	case replyInternalError:
		return "INTERNAL_ERROR"
	}
	return "UNKNOWN"
}

// newError builds an exception whose text reads like RabbitMQ's: "NOT_FOUND - text".
// The text is cut to fit a shortstr.
func newError(code uint16, text string) *Error {
	t := replyName(code) + " - " + text
	if len(t) > 255 {
		t = t[:255]
	}
	return &Error{Code: code, Text: t}
}

// errSyntax is the decoders' answer to a field that runs past its frame or is malformed.
var errSyntax = newError(replySyntaxError, "malformed field")

func frameError(text string) *Error      { return newError(replyFrameError, text) }
func syntaxError(text string) *Error     { return newError(replySyntaxError, text) }
func channelError(text string) *Error    { return newError(replyChannelError, text) }
func unexpectedFrame(text string) *Error { return newError(replyUnexpectedFrame, text) }
func notAllowed(text string) *Error      { return newError(replyNotAllowed, text) }
func notImplemented(text string) *Error  { return newError(replyNotImplemented, text) }
func notFound(text string) *Error        { return newError(replyNotFound, text) }
func accessRefused(text string) *Error   { return newError(replyAccessRefused, text) }
func preconditionFailed(text string) *Error {
	return newError(replyPreconditionFailed, text)
}
func commandInvalid(text string) *Error { return newError(replyCommandInvalid, text) }
func resourceLocked(text string) *Error { return newError(replyResourceLocked, text) }
func internalError(text string) *Error  { return newError(replyInternalError, text) }
