// coreg-example trains a concept from a folder of photos on `coreg-trainer serve`,
// then generates images of it on `coreg-sampler serve` and writes them as PNG files:
// the whole path a client takes, through the Go stubs generated from proto/.
//
//	coreg-example --trainer 127.0.0.1:50051 --sampler 127.0.0.1:50052 \
//	    --images photos/ --out generated/
//
// The defaults (64 px, a few steps) suit the tiny test model on a CPU; raise
// --resolution, --stage1-steps, --stage2-steps and --steps for a real model. It
// prints one line per generated file (`wrote PATH`) and exits 1 on any failure.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/coreg/coreg/clients/go/coreg"
	coregv1 "github.com/coreg/coreg/clients/go/gen/coreg/v1"
	"google.golang.org/protobuf/proto"
)

type prompts []string

func (p *prompts) String() string     { return strings.Join(*p, " | ") }
func (p *prompts) Set(s string) error { *p = append(*p, s); return nil }

func main() {
	var (
		trainerAddr  = flag.String("trainer", "127.0.0.1:50051", "the trainer service, host:port")
		samplerAddr  = flag.String("sampler", "127.0.0.1:50052", "the sampler service, host:port")
		imagesDir    = flag.String("images", "", "folder of training photos (png, jpg, webp); required")
		outDir       = flag.String("out", "generated", "folder the generated PNGs are written to")
		token        = flag.String("token", os.Getenv("COREG_TOKEN"), "bearer token (default $COREG_TOKEN)")
		useTLS       = flag.Bool("tls", false, "connect over TLS (system roots unless --ca)")
		caFile       = flag.String("ca", "", "PEM file of the CAs to trust (implies --tls)")
		serverName   = flag.String("server-name", "", "name the servers' certificates are checked against")
		concept      = flag.String("concept", "goflow", "the concept's name in the store")
		category     = flag.String("category", "dog", "the super-category word (one CLIP token)")
		requestID    = flag.String("request-id", "", "makes the training request idempotent (optional)")
		resolution   = flag.Uint("resolution", 64, "training image size in pixels")
		stage1Steps  = flag.Uint("stage1-steps", 6, "stage 1 (embedding) steps")
		stage2Steps  = flag.Uint("stage2-steps", 2, "stage 2 (U-Net) steps; 0 skips stage 2")
		batchSize    = flag.Uint("batch-size", 2, "batch size of both stages")
		size         = flag.Uint("size", 64, "generated image width and height in pixels")
		steps        = flag.Uint("steps", 4, "denoising steps per image")
		seed         = flag.Uint64("seed", 0, "seed of the training job and of the first image")
		healthWait   = flag.Duration("health-timeout", 3*time.Minute, "how long to wait for both services to be SERVING")
		jobTimeout   = flag.Duration("job-timeout", 10*time.Minute, "how long the training job may take")
		genTimeout   = flag.Duration("generate-timeout", 5*time.Minute, "how long generation may take")
		promptsFlags prompts
	)
	flag.Var(&promptsFlags, "prompt", "a prompt with `{}` where the concept goes (repeatable; default two prompts)")
	flag.Parse()
	if *imagesDir == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: coreg-example --images DIR [flags] (see --help)")
		os.Exit(2)
	}
	if len(promptsFlags) == 0 {
		promptsFlags = prompts{"a photo of {}", "{} on the beach"}
	}

	opts := coreg.Options{Token: *token, TLS: *useTLS, CAFile: *caFile, ServerName: *serverName}
	err := run(opts, *trainerAddr, *samplerAddr, *imagesDir, *outDir, *healthWait, *jobTimeout, *genTimeout,
		*requestID, &coregv1.TrainingJobSpec{
			ConceptName: *concept,
			Category:    *category,
			Seed:        *seed,
			Resolution:  proto.Uint32(uint32(*resolution)),
			Stage1:      stage1(uint32(*stage1Steps), uint32(*batchSize)),
			Stage2: &coregv1.Stage2Parameters{
				Steps:     proto.Uint32(uint32(*stage2Steps)),
				BatchSize: proto.Uint32(uint32(*batchSize)),
			},
		}, &coregv1.GenerateRequest{
			Prompts: promptsFlags,
			Steps:   proto.Uint32(uint32(*steps)),
			Width:   uint32(*size),
			Height:  uint32(*size),
			Seeds:   seeds(*seed, len(promptsFlags)),
		})
	if err != nil {
		fmt.Fprintf(os.Stderr, "coreg-example: FAILED: %v\n", err)
		os.Exit(1)
	}
}

// stage1 is stage 1 with `steps` steps; a stage shorter than the default rescaling
// window (steps 120 to 180) gets one scaled into it.
func stage1(steps, batchSize uint32) *coregv1.Stage1Parameters {
	p := &coregv1.Stage1Parameters{Steps: proto.Uint32(steps), BatchSize: proto.Uint32(batchSize)}
	if steps < 180 {
		p.RescaleRecordAt = proto.Uint32(steps / 3)
		p.RescaleUntil = proto.Uint32(steps * 2 / 3)
	}
	return p
}

// seeds gives image i the seed first+i, so a rerun reproduces the images.
func seeds(first uint64, n int) []uint64 {
	s := make([]uint64, n)
	for i := range s {
		s[i] = first + uint64(i)
	}
	return s
}

func run(opts coreg.Options, trainerAddr, samplerAddr, imagesDir, outDir string,
	healthWait, jobTimeout, genTimeout time.Duration, requestID string,
	spec *coregv1.TrainingJobSpec, gen *coregv1.GenerateRequest) error {
	images, err := coreg.ReadImages(imagesDir)
	if err != nil {
		return fmt.Errorf("reading the training photos: %w", err)
	}
	spec.Images = images

	trainer, err := coreg.Dial(trainerAddr, opts)
	if err != nil {
		return err
	}
	defer trainer.Close()
	sampler, err := coreg.Dial(samplerAddr, opts)
	if err != nil {
		return err
	}
	defer sampler.Close()

	ctx, cancel := context.WithTimeout(context.Background(), healthWait)
	defer cancel()
	for _, s := range []struct {
		name string
		c    *coreg.Client
	}{{"trainer", trainer}, {"sampler", sampler}} {
		if err := s.c.WaitServing(ctx); err != nil {
			return fmt.Errorf("the %s at %s: %w", s.name, map[string]string{"trainer": trainerAddr, "sampler": samplerAddr}[s.name], err)
		}
	}
	fmt.Printf("both services are SERVING; training %q from %d photos in %s\n", spec.ConceptName, len(images), imagesDir)

	// Training, with a line per progress event.
	ctx, cancel = context.WithTimeout(context.Background(), jobTimeout)
	defer cancel()
	start := time.Now()
	progressEvents := 0
	job, err := trainer.Train(ctx, requestID, spec, func(p *coregv1.TrainingProgress) {
		progressEvents++
		fmt.Printf("  %s\n", coreg.DescribeProgress(p))
	})
	var jobErr *coreg.JobError
	if errors.As(err, &jobErr) {
		return err
	}
	if err != nil {
		return fmt.Errorf("training: %w", err)
	}
	if progressEvents == 0 {
		return fmt.Errorf("job %s sent no progress event", job.GetId())
	}
	fmt.Printf("job %s SUCCEEDED in %s: concept %s version %s\n", job.GetId(),
		time.Since(start).Round(100*time.Millisecond), job.GetConcept().GetName(), job.GetConcept().GetVersion())

	// Generation with the concept just written, on the sampler (which shares the store).
	ctx, cancel = context.WithTimeout(context.Background(), genTimeout)
	defer cancel()
	info, err := sampler.Sampler.GetConcept(ctx, &coregv1.GetConceptRequest{Concept: job.GetConcept()})
	if err != nil {
		return fmt.Errorf("GetConcept(%s): %w", job.GetConcept().GetName(), err)
	}
	fmt.Printf("the sampler has %s (token %s, base model %s)\n", info.GetRef().GetName(), info.GetToken(), info.GetBaseModel())
	gen.Concept = job.GetConcept()
	start = time.Now()
	files, err := sampler.GenerateToFiles(ctx, gen, outDir, spec.ConceptName, func(p *coregv1.GenerationProgress) {
		if p.GetTotalSteps() > 0 {
			fmt.Printf("  generating: step %d/%d\n", p.GetStep(), p.GetTotalSteps())
		}
	})
	if err != nil {
		return err
	}
	if len(files) != len(gen.Prompts) {
		return fmt.Errorf("asked for %d images, got %d", len(gen.Prompts), len(files))
	}
	fmt.Printf("generated %d images in %s\n", len(files), time.Since(start).Round(100*time.Millisecond))
	for _, f := range files {
		if f.Width != gen.Width || f.Height != gen.Height {
			return fmt.Errorf("%s is %d×%d, asked for %d×%d", f.Path, f.Width, f.Height, gen.Width, gen.Height)
		}
		fmt.Printf("wrote %s (%q, seed %d, %d×%d)\n", f.Path, f.Prompt, f.Seed, f.Width, f.Height)
	}
	return nil
}
