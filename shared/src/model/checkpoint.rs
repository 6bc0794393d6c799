//! Activation (gradient) checkpointing: a block's intermediate activations are not kept
//! for backward but recomputed from its inputs when backward reaches it, trading one
//! extra forward of the block for the memory of everything it would have saved.
//!
//! This is the reentrant variant of `torch.utils.checkpoint`, which tch lacks; its C++
//! half (`shared/csrc/checkpoint.cpp`) is a custom libtorch autograd function whose
//! forward and backward call back into the Rust closure given to [`checkpoint`].

// The one FFI boundary of the library (the workspace denies `unsafe_code` elsewhere):
// libtorch calls back into Rust closures through raw pointers. Every `unsafe` item
// below states what it relies on.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{TchError, Tensor};
use torch_sys::C_tensor;

type Body = unsafe extern "C" fn(
    closure: *mut c_void,
    inputs: *const *const C_tensor,
    n_inputs: usize,
    results: *mut c_void,
);
type Release = unsafe extern "C" fn(closure: *mut c_void);
type Receive = unsafe extern "C" fn(receiver: *mut c_void, output: *mut C_tensor);
type ReceiveError =
    unsafe extern "C" fn(receiver: *mut c_void, message: *const c_char, length: usize);

extern "C" {
    fn coreg_checkpoint_apply(
        inputs: *const *const C_tensor,
        n_inputs: usize,
        closure: *mut c_void,
        body: Body,
        release: Release,
        receiver: *mut c_void,
        receive: Receive,
        receive_error: ReceiveError,
    ) -> bool;
    fn coreg_checkpoint_push_output(results: *mut c_void, output: *const C_tensor);
    fn coreg_checkpoint_fail(results: *mut c_void, message: *const c_char, length: usize);
}

/// Runs `f(inputs)` without keeping its intermediate activations for backward; when
/// backward reaches the outputs, `f` runs again with grad enabled and gradients flow
/// through that recomputation.
///
/// Contract for `f`:
/// - It must be deterministic: the recomputation must reproduce the forward exactly
///   (no dropout or other random sampling; the random state is not replayed).
/// - Tensors it closes over are parameters: leaves whose `.grad` accumulates when
///   backward reaches the checkpoint, as with torch's reentrant checkpoint. Close over
///   shallow clones (`Tensor::shallow_clone`), which share the parameter's storage
///   and gradient. A closed-over tensor computed from parameters outside `f` would
///   have its part of the outer graph consumed by the recomputation's backward: pass
///   it as an input instead.
/// - It may run on libtorch's autograd threads (on CUDA, a device thread), hence
///   `Send`; it is dropped exactly once, when the autograd graph holding it is
///   dropped, or right away when no graph was built.
/// - Its recomputation runs inside the `backward` call, so it must not wait for a
///   lock that the thread calling `backward` holds.
///
/// Gradients reach the inputs through the autograd graph and the parameters through
/// `.grad`, so use `backward` rather than `Tensor::run_backward` with parameters as
/// its inputs. Double backward (`create_graph`) is not supported.
///
/// With grad mode off, `f` just runs. With grad mode on and no input requiring grad,
/// `f` runs once with grad to learn whether a closed-over parameter requires grad: if
/// none does, its outputs are returned as they are; if one does, its activations are
/// released and the outputs take part in the graph like those of any checkpoint.
///
/// Panics if `f` or libtorch fails; see [`f_checkpoint`].
pub fn checkpoint<F>(inputs: &[&Tensor], f: F) -> Vec<Tensor>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    match f_checkpoint(inputs, f) {
        Ok(outputs) => outputs,
        Err(err) => panic!("{err}"),
    }
}

/// [`checkpoint`] that returns an error instead of panicking when `f` panics or
/// libtorch fails in the forward pass. A failure during the recomputation surfaces
/// as the error of the `backward` call that triggered it.
pub fn f_checkpoint<F>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>, TchError>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    let input_pointers: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let closure = Box::into_raw(Box::new(f)).cast::<c_void>();
    let mut received = Received::default();
    // SAFETY: the pointers stay valid for the call (`inputs` is borrowed, `received`
    // outlives it); `coreg_checkpoint_apply` takes ownership of `closure` and frees it
    // through `release_closure::<F>`, the drop matching `Box::<F>::into_raw`.
    let succeeded = unsafe {
        coreg_checkpoint_apply(
            input_pointers.as_ptr(),
            input_pointers.len(),
            closure,
            run_closure::<F>,
            release_closure::<F>,
            (&mut received as *mut Received).cast(),
            receive_output,
            receive_error,
        )
    };
    match (succeeded, received.error) {
        (true, None) => Ok(received.outputs),
        (_, error) => {
            Err(TchError::Torch(error.unwrap_or_else(|| {
                "checkpoint failed without a message".to_owned()
            })))
        }
    }
}

#[derive(Default)]
struct Received {
    outputs: Vec<Tensor>,
    error: Option<String>,
}

/// # Safety
/// `closure` comes from `Box::<F>::into_raw`; `inputs` points to `n_inputs` valid
/// tensors and `results` to the C++ side's result collector, both for the call.
unsafe extern "C" fn run_closure<F>(
    closure: *mut c_void,
    inputs: *const *const C_tensor,
    n_inputs: usize,
    results: *mut c_void,
) where
    F: Fn(&[Tensor]) -> Vec<Tensor>,
{
    let f = &*closure.cast::<F>();
    let inputs = std::slice::from_raw_parts(inputs, n_inputs);
    // Unwinding through C++ frames is undefined behaviour: a panic (a failing tch call
    // included) becomes an error that the C++ side rethrows as an exception.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let inputs: Vec<Tensor> = inputs
            .iter()
            .map(|&pointer| Tensor::clone_from_ptr(pointer.cast_mut()))
            .collect();
        f(&inputs)
    }));
    match outcome {
        Ok(outputs) => {
            for output in &outputs {
                coreg_checkpoint_push_output(results, output.as_ptr());
            }
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            coreg_checkpoint_fail(results, message.as_ptr().cast(), message.len());
            // Dropping a panic payload can itself panic; don't let that unwind either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        }
    }
}

/// # Safety
/// `closure` comes from `Box::<F>::into_raw` and is not used afterwards.
unsafe extern "C" fn release_closure<F>(closure: *mut c_void) {
    let closure = Box::from_raw(closure.cast::<F>());
    // Runs on whichever thread drops the graph, possibly inside libtorch: a panicking
    // destructor of a captured value must not unwind there, and has nobody to tell.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(closure)));
}

/// # Safety
/// `receiver` points to a live `Received`; `output` is a heap tensor now owned here.
unsafe extern "C" fn receive_output(receiver: *mut c_void, output: *mut C_tensor) {
    let received = &mut *receiver.cast::<Received>();
    received.outputs.push(Tensor::from_ptr(output));
}

/// # Safety
/// `receiver` points to a live `Received`; `message` to `length` bytes.
unsafe extern "C" fn receive_error(receiver: *mut c_void, message: *const c_char, length: usize) {
    let received = &mut *receiver.cast::<Received>();
    let bytes = std::slice::from_raw_parts(message.cast::<u8>(), length);
    received.error = Some(String::from_utf8_lossy(bytes).into_owned());
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tch::{Device, Kind};

    /// A three-layer perceptron (tanh, then gelu) whose parameters are leaves that
    /// require grad.
    struct Mlp {
        params: Vec<Tensor>,
    }

    impl Mlp {
        fn new(width: i64) -> Mlp {
            let shapes: [&[i64]; 6] = [
                &[width, width],
                &[width],
                &[2 * width, width],
                &[2 * width],
                &[width, 2 * width],
                &[width],
            ];
            let params = shapes
                .iter()
                .map(|&shape| {
                    (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.3).set_requires_grad(true)
                })
                .collect();
            Mlp { params }
        }

        fn shallow_params(&self) -> Vec<Tensor> {
            self.params.iter().map(Tensor::shallow_clone).collect()
        }

        fn forward(params: &[Tensor], x: &Tensor) -> Tensor {
            let h = x.linear(&params[0], Some(&params[1])).tanh();
            let h = h.linear(&params[2], Some(&params[3])).gelu("none");
            h.linear(&params[4], Some(&params[5]))
        }

        /// The same function as a checkpoint body.
        fn body(&self) -> impl Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static {
            let params = self.shallow_params();
            move |inputs: &[Tensor]| vec![Mlp::forward(&params, &inputs[0])]
        }

        fn take_grads(&self) -> Vec<Tensor> {
            self.params.iter().map(take_grad).collect()
        }
    }

    fn take_grad(t: &Tensor) -> Tensor {
        let grad = t.grad();
        assert!(
            grad.defined(),
            "no gradient reached a tensor that requires grad"
        );
        let copy = grad.copy();
        let mut grad = grad;
        let _ = grad.zero_();
        copy
    }

    /// The input's gradient followed by every parameter's, zeroing them for the next run.
    fn take_grads(x: &Tensor, mlps: &[&Mlp]) -> Vec<Tensor> {
        std::iter::once(take_grad(x))
            .chain(mlps.iter().flat_map(|mlp| mlp.take_grads()))
            .collect()
    }

    fn max_relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
        assert_eq!(actual.size(), expected.size());
        let scale = expected.abs().max().double_value(&[]).max(1e-12);
        (actual - expected).abs().max().double_value(&[]) / scale
    }

    fn assert_all_close(actual: &[Tensor], expected: &[Tensor]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let error = max_relative_error(a, e);
            assert!(error <= 1e-6, "tensor {i}: max relative error {error}");
        }
    }

    /// Backward that keeps the graph, which tch only offers through torch-sys.
    fn backward_retaining_graph(loss: &Tensor) {
        // SAFETY: `loss` is a live tensor; the error string, if any, is leaked (tests).
        let error = unsafe {
            torch_sys::at_backward(loss.as_ptr().cast_mut(), 1, 0);
            torch_sys::get_and_reset_last_err()
        };
        assert!(error.is_null(), "backward failed");
    }

    fn upstream_weights(like: &Tensor) -> Tensor {
        Tensor::randn(like.size(), (Kind::Float, Device::Cpu))
    }

    #[test]
    fn gradients_match_the_plain_computation() {
        tch::manual_seed(1);
        let mlp = Mlp::new(8);
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);

        let y = Mlp::forward(&mlp.params, &x);
        let weights = upstream_weights(&y);
        (&y * &weights).sum(Kind::Float).backward();
        let (expected_x, expected_params) = (take_grad(&x), mlp.take_grads());

        let y_checkpointed = checkpoint(&[&x], mlp.body()).remove(0);
        assert!(y_checkpointed.requires_grad());
        assert_all_close(&[y_checkpointed.detach()], &[y.detach()]);
        (&y_checkpointed * &weights).sum(Kind::Float).backward();
        assert_all_close(&[take_grad(&x)], &[expected_x]);
        assert_all_close(&mlp.take_grads(), &expected_params);
    }

    #[test]
    fn gradients_match_across_several_and_nested_checkpoints() {
        tch::manual_seed(2);
        let first = Mlp::new(6);
        let second = Mlp::new(6);
        let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // An input that needs no grad, and a second output: both must pass through.
        let context = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));

        let plain = |x: &Tensor| {
            let h = Mlp::forward(&first.params, &(x + &context));
            let y = Mlp::forward(&second.params, &h);
            (h, y)
        };
        let (h, y) = plain(&x);
        let (weights_h, weights_y) = (upstream_weights(&h), upstream_weights(&y));
        let loss = |h: &Tensor, y: &Tensor| {
            (h * &weights_h).sum(Kind::Float) + (y * &weights_y).sum(Kind::Float)
        };
        loss(&h, &y).backward();
        let expected = take_grads(&x, &[&first, &second]);

        // Two checkpoints one after the other.
        let first_body = first.body();
        let h_checkpointed = checkpoint(&[&x, &context], move |inputs: &[Tensor]| {
            first_body(&[&inputs[0] + &inputs[1]])
        })
        .remove(0);
        let y_checkpointed = checkpoint(&[&h_checkpointed], second.body()).remove(0);
        loss(&h_checkpointed, &y_checkpointed).backward();
        let sequential = take_grads(&x, &[&first, &second]);
        assert_all_close(&sequential, &expected);
        assert!(!context.grad().defined());

        // One checkpoint inside another, returning both outputs.
        let (first_params, second_params) = (first.shallow_params(), second.shallow_params());
        let outer = checkpoint(&[&x, &context], move |inputs: &[Tensor]| {
            let inner_params: Vec<Tensor> =
                first_params.iter().map(Tensor::shallow_clone).collect();
            let h = checkpoint(&[&inputs[0], &inputs[1]], move |inputs: &[Tensor]| {
                vec![Mlp::forward(&inner_params, &(&inputs[0] + &inputs[1]))]
            })
            .remove(0);
            let y = Mlp::forward(&second_params, &h);
            vec![h, y]
        });
        loss(&outer[0], &outer[1]).backward();
        let nested = take_grads(&x, &[&first, &second]);
        assert_all_close(&nested, &expected);
    }

    #[test]
    fn a_retained_graph_backpropagates_twice() {
        tch::manual_seed(3);
        let mlp = Mlp::new(5);
        let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);

        let loss = Mlp::forward(&mlp.params, &x).square().sum(Kind::Float);
        backward_retaining_graph(&loss);
        backward_retaining_graph(&loss);
        let expected = take_grads(&x, &[&mlp]);

        let loss = checkpoint(&[&x], mlp.body())[0].square().sum(Kind::Float);
        backward_retaining_graph(&loss);
        backward_retaining_graph(&loss);
        let actual = take_grads(&x, &[&mlp]);
        assert_all_close(&actual, &expected);
        // Without retain_graph the saved inputs are gone: libtorch's usual error.
        loss.backward();
        let error = loss.f_backward().unwrap_err().to_string();
        assert!(error.contains("second time"), "{error}");
    }

    #[test]
    fn parameters_get_gradients_when_no_input_requires_grad() {
        tch::manual_seed(4);
        let mlp = Mlp::new(4);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));

        Mlp::forward(&mlp.params, &x).sum(Kind::Float).backward();
        let expected = mlp.take_grads();

        let y = checkpoint(&[&x], mlp.body()).remove(0);
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        assert_all_close(&mlp.take_grads(), &expected);
        assert!(!x.grad().defined());

        // Frozen parameters too: nothing requires grad, so no graph at all.
        let frozen: Vec<Tensor> = mlp.params.iter().map(Tensor::detach).collect();
        let y = checkpoint(&[&x], move |inputs: &[Tensor]| {
            vec![Mlp::forward(&frozen, &inputs[0])]
        })
        .remove(0);
        assert!(!y.requires_grad());
    }

    #[test]
    fn no_grad_mode_runs_the_function_directly() {
        tch::manual_seed(5);
        let mlp = Mlp::new(4);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let expected = tch::no_grad(|| Mlp::forward(&mlp.params, &x));

        let alive = Arc::new(());
        let witness = Arc::clone(&alive);
        let body = mlp.body();
        let y = tch::no_grad(|| {
            checkpoint(&[&x], move |inputs: &[Tensor]| {
                let _witness = &witness;
                body(inputs)
            })
        })
        .remove(0);
        assert!(!y.requires_grad());
        assert_all_close(&[y], &[expected]);
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "the closure outlived the call"
        );
    }

    #[test]
    fn the_closure_is_dropped_with_the_graph() {
        tch::manual_seed(6);
        let mlp = Mlp::new(4);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let alive = Arc::new(());
        let checkpointed = |alive: &Arc<()>| {
            let witness = Arc::clone(alive);
            let body = mlp.body();
            checkpoint(&[&x], move |inputs: &[Tensor]| {
                let _witness = &witness;
                body(inputs)
            })
            .remove(0)
        };

        let y = checkpointed(&alive);
        assert_eq!(Arc::strong_count(&alive), 2);
        drop(y);
        assert_eq!(Arc::strong_count(&alive), 1, "dropped without backward");

        let loss = checkpointed(&alive).sum(Kind::Float);
        loss.backward();
        // The node, and so the closure, lives as long as the graph does.
        assert_eq!(Arc::strong_count(&alive), 2);
        drop(loss);
        assert_eq!(Arc::strong_count(&alive), 1, "dropped after backward");
    }

    #[test]
    fn failures_of_the_function_become_errors() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let error = f_checkpoint(&[&x], |_: &[Tensor]| panic!("forward broke")).unwrap_err();
        assert!(error.to_string().contains("forward broke"), "{error}");

        // A function that fails only on its second call fails the recomputation.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let y = checkpoint(&[&x], move |inputs: &[Tensor]| {
            if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                let bad_shape = Tensor::ones([3], (Kind::Float, Device::Cpu));
                return vec![&inputs[0] + bad_shape];
            }
            vec![&inputs[0] * 2.0]
        })
        .remove(0);
        let error = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(error.contains("checkpointed function failed"), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
