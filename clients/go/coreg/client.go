// Package coreg is a small client for the coreg services: connect (with an optional
// bearer token and TLS), wait for health, train a concept from a folder of images
// while reporting progress, and generate images to PNG files.
//
// It uses only the stubs generated from proto/coreg/v1 (package coregv1, in
// ../gen/coreg/v1); anything it does not wrap is reachable through Client.Trainer
// and Client.Sampler.
package coreg

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	coregv1 "github.com/coreg/coreg/clients/go/gen/coreg/v1"
)

// MaxMessageBytes bounds the messages sent and received: Generate responses carry
// inline PNGs, and training requests inline photos (the server accepts 64 MiB).
const MaxMessageBytes = 64 << 20

// Options say how to connect.
type Options struct {
	// Token, when set, is sent with every call as `authorization: Bearer <Token>`.
	Token string
	// TLS connects over TLS, verifying the server against CAFile (or the system's
	// roots when CAFile is empty).
	TLS bool
	// CAFile is a PEM file of the certificate authorities to trust (implies TLS).
	CAFile string
	// ServerName overrides the name the server's certificate is checked against.
	ServerName string
}

// Client is one connection to a coreg service. The trainer and the sampler are
// separate services, usually at separate addresses: dial each, and use the stub of
// the service that address serves.
type Client struct {
	conn    *grpc.ClientConn
	Trainer coregv1.TrainerServiceClient
	Sampler coregv1.SamplerServiceClient
	Health  healthpb.HealthClient
}

// Dial connects to `address` (host:port). The connection is made lazily: the first
// call, or WaitServing, finds out whether the server is there.
func Dial(address string, opts Options) (*Client, error) {
	var creds credentials.TransportCredentials
	switch {
	case opts.CAFile != "":
		c, err := credentials.NewClientTLSFromFile(opts.CAFile, opts.ServerName)
		if err != nil {
			return nil, fmt.Errorf("reading the CA file %s: %w", opts.CAFile, err)
		}
		creds = c
	case opts.TLS:
		creds = credentials.NewTLS(&tls.Config{ServerName: opts.ServerName, MinVersion: tls.VersionTLS12})
	default:
		creds = insecure.NewCredentials()
	}
	dialOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(MaxMessageBytes),
			grpc.MaxCallSendMsgSize(MaxMessageBytes),
		),
	}
	if opts.Token != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{opts.Token}))
	}
	conn, err := grpc.NewClient(address, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", address, err)
	}
	return &Client{
		conn:    conn,
		Trainer: coregv1.NewTrainerServiceClient(conn),
		Sampler: coregv1.NewSamplerServiceClient(conn),
		Health:  healthpb.NewHealthClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// bearer sends the token as `authorization: Bearer …`. It is sent over plaintext
// connections too (a loopback or in-cluster server without TLS); use TLS elsewhere.
type bearer struct{ token string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// WaitServing polls grpc.health.v1 until the server's overall status is SERVING (it
// has loaded and warmed its base model) or ctx ends.
func (c *Client) WaitServing(ctx context.Context) error {
	last := "no answer"
	for {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		reply, err := c.Health.Check(callCtx, &healthpb.HealthCheckRequest{})
		cancel()
		switch {
		case err == nil && reply.GetStatus() == healthpb.HealthCheckResponse_SERVING:
			return nil
		case err == nil:
			last = reply.GetStatus().String()
		default:
			// UNAVAILABLE while the server is still binding its port.
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not SERVING (last: %s): %w", last, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// ImageExtensions are the photo formats the trainer accepts.
var ImageExtensions = []string{".png", ".jpg", ".jpeg", ".webp"}

// ReadImages reads the photos (by extension, see ImageExtensions) directly in
// `folder`, in name order, as inline training images.
func ReadImages(folder string) ([]*coregv1.TrainingImage, error) {
	entries, err := os.ReadDir(folder)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if e.Type().IsRegular() && contains(ImageExtensions, ext) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return nil, fmt.Errorf("no %s images in %s", strings.Join(ImageExtensions, "/"), folder)
	}
	images := make([]*coregv1.TrainingImage, 0, len(names))
	for _, name := range names {
		data, err := os.ReadFile(filepath.Join(folder, name))
		if err != nil {
			return nil, err
		}
		images = append(images, &coregv1.TrainingImage{Source: &coregv1.TrainingImage_Data{Data: data}})
	}
	return images, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// JobError is a training job that ended other than SUCCEEDED.
type JobError struct{ Job *coregv1.TrainingJob }

func (e *JobError) Error() string {
	msg := fmt.Sprintf("job %s ended %s", e.Job.GetId(), e.Job.GetState())
	if e.Job.GetError() != "" {
		msg += ": " + e.Job.GetError()
	}
	return msg
}

// Train queues the job `spec` describes (with `requestID`, when not empty, making
// the call idempotent) and watches it until it ends, calling `onProgress` (when not
// nil) for every step. It returns the final job: SUCCEEDED, with the concept it
// wrote, or a *JobError. If the watch stream breaks (the replica restarted), it
// watches again: the job lives in the store and another replica resumes it.
func (c *Client) Train(ctx context.Context, requestID string, spec *coregv1.TrainingJobSpec,
	onProgress func(*coregv1.TrainingProgress)) (*coregv1.TrainingJob, error) {
	job, err := c.Trainer.CreateTrainingJob(ctx, &coregv1.CreateTrainingJobRequest{
		RequestId: requestID,
		Spec:      spec,
	})
	if err != nil {
		return nil, fmt.Errorf("CreateTrainingJob: %w", err)
	}
	final, err := c.Watch(ctx, job.GetId(), onProgress)
	if err != nil {
		return nil, err
	}
	if final.GetState() != coregv1.JobState_JOB_STATE_SUCCEEDED {
		return final, &JobError{final}
	}
	return final, nil
}

// Watch follows job `id` until it ends and returns it in its final state.
func (c *Client) Watch(ctx context.Context, id string,
	onProgress func(*coregv1.TrainingProgress)) (*coregv1.TrainingJob, error) {
	const retries = 5
	for attempt := 0; ; attempt++ {
		final, err := c.watchOnce(ctx, id, onProgress)
		if err == nil {
			return final, nil
		}
		if code := status.Code(err); attempt >= retries || ctx.Err() != nil ||
			(code != codes.Unavailable && !errors.Is(err, errStreamEnded)) {
			return nil, fmt.Errorf("WatchTrainingJob(%s): %w", id, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("WatchTrainingJob(%s): %w", id, ctx.Err())
		case <-time.After(time.Second << attempt):
		}
	}
}

var errStreamEnded = errors.New("the stream ended before the job did")

func (c *Client) watchOnce(ctx context.Context, id string,
	onProgress func(*coregv1.TrainingProgress)) (*coregv1.TrainingJob, error) {
	stream, err := c.Trainer.WatchTrainingJob(ctx, &coregv1.WatchTrainingJobRequest{Id: id})
	if err != nil {
		return nil, err
	}
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			return nil, errStreamEnded
		}
		if err != nil {
			return nil, err
		}
		switch e := event.GetEvent().(type) {
		case *coregv1.TrainingJobEvent_Progress:
			if onProgress != nil {
				onProgress(e.Progress)
			}
		case *coregv1.TrainingJobEvent_Job:
			if Finished(e.Job.GetState()) {
				return e.Job, nil
			}
		}
	}
}

// Finished reports whether a job in `state` has ended.
func Finished(state coregv1.JobState) bool {
	switch state {
	case coregv1.JobState_JOB_STATE_SUCCEEDED, coregv1.JobState_JOB_STATE_FAILED,
		coregv1.JobState_JOB_STATE_CANCELLED:
		return true
	}
	return false
}

// DescribeProgress is one line for a training progress event, e.g.
// "stage 1 (embedding): step 3/6, 0.41 s/step, eta 1.2s, total 0.1234".
func DescribeProgress(p *coregv1.TrainingProgress) string {
	stage := map[coregv1.TrainingStage]string{
		coregv1.TrainingStage_TRAINING_STAGE_EMBEDDING: "stage 1 (embedding)",
		coregv1.TrainingStage_TRAINING_STAGE_UNET:      "stage 2 (U-Net)",
		coregv1.TrainingStage_TRAINING_STAGE_WRITING:   "writing",
	}[p.GetStage()]
	if stage == "" {
		stage = "?"
	}
	line := fmt.Sprintf("%s: step %d/%d", stage, p.GetStep(), p.GetTotalSteps())
	if t := p.GetTiming(); t != nil {
		if s := t.GetStepTime().AsDuration(); s > 0 {
			line += fmt.Sprintf(", %.2f s/step", s.Seconds())
		}
		if eta := t.GetEta().AsDuration(); eta > 0 {
			line += ", eta " + eta.Round(100*time.Millisecond).String()
		}
	}
	if total, ok := p.GetLosses()["total"]; ok {
		line += fmt.Sprintf(", loss %.4f", total)
	}
	return line
}

// GeneratedFile is one image Generate returned, written to Path.
type GeneratedFile struct {
	Path   string
	Prompt string
	Seed   uint64
	Width  uint32
	Height uint32
}

// GenerateToFiles runs `req` (its destination forced to inline PNGs), calling
// `onProgress` (when not nil) for every progress event, and writes each image to
// `outDir`/`prefix`-<index>.png. It fails if an image did not complete.
func (c *Client) GenerateToFiles(ctx context.Context, req *coregv1.GenerateRequest, outDir, prefix string,
	onProgress func(*coregv1.GenerationProgress)) ([]GeneratedFile, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	req.Destination = coregv1.ImageDestination_IMAGE_DESTINATION_INLINE
	stream, err := c.Sampler.Generate(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("Generate: %w", err)
	}
	var files []GeneratedFile
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return files, fmt.Errorf("Generate: %w", err)
		}
		switch e := event.GetEvent().(type) {
		case *coregv1.GenerateResponse_Progress:
			if onProgress != nil {
				onProgress(e.Progress)
			}
		case *coregv1.GenerateResponse_Image:
			img := e.Image
			if img.GetFinishReason() != coregv1.FinishReason_FINISH_REASON_COMPLETED {
				return files, fmt.Errorf("image %d (%q) ended %s", img.GetIndex(), img.GetPrompt(), img.GetFinishReason())
			}
			png := img.GetPng()
			if len(png) == 0 {
				return files, fmt.Errorf("image %d (%q) came without PNG bytes", img.GetIndex(), img.GetPrompt())
			}
			path := filepath.Join(outDir, fmt.Sprintf("%s-%d.png", prefix, img.GetIndex()))
			if err := os.WriteFile(path, png, 0o644); err != nil {
				return files, err
			}
			files = append(files, GeneratedFile{
				Path: path, Prompt: img.GetPrompt(), Seed: img.GetSeed(),
				Width: img.GetWidth(), Height: img.GetHeight(),
			})
		}
	}
	return files, nil
}
