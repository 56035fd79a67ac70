"""Machine unlearning: worst-case forget-set selection and the unlearning methods it is judged with."""
